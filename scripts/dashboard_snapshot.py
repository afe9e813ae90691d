#!/usr/bin/env python3
"""Make docs/dashboard.png from real data: a tiny LLaVA served by `vllm serve` with the plugin, a real
Prometheus scraping it, a few minutes of mixed traffic (budgets none/64/128/192/1000, several selectors),
then scripts/render_dashboard.py over that Prometheus.

    .venv/bin/python scripts/dashboard_snapshot.py [--minutes 3] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to send traffic")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()

    import openai

    from textscythe_dev.images import scene, user_message
    from textscythe_dev.prometheus import PrometheusServer
    from textscythe_dev.server import VLLMServer
    from textscythe_dev.tiny_models import build_tiny_llava

    model = build_tiny_llava(Path(tempfile.mkdtemp(prefix="tiny-llava-")), kind="llava-1.5")
    mix = itertools.cycle([
        (None, None), (64, "textscythe"), (192, "textscythe"), (128, "divprune"), (None, None),
        (64, "visionzip"), (1000, "textscythe"), (64, "cls_attention"),
    ])
    with VLLMServer(model, ["--load-format", "dummy"]) as server, \
            PrometheusServer(server.base_url.removeprefix("http://"), scrape_interval="2s") as prometheus:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="-", max_retries=0, timeout=120)
        deadline = time.monotonic() + 60 * args.minutes
        for index in itertools.count():
            if time.monotonic() > deadline:
                break
            budget, selector = next(mix)
            extra = {} if budget is None else {"visual_token_budget": budget, "visual_token_selector": selector}
            client.chat.completions.create(
                model=server.model_name, messages=[user_message("what colour is the umbrella ?", scene(index))],
                max_tokens=8, extra_body=extra or None,
            )
        time.sleep(5)
        return subprocess.call([
            sys.executable, str(REPO_ROOT / "scripts" / "render_dashboard.py"), "--prometheus", prometheus.base_url,
            "--minutes", str(args.minutes + 0.5), "--window", "30s", "--out", str(args.out),
        ])


if __name__ == "__main__":
    sys.exit(main())
