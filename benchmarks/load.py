"""Sustained mixed load against a real ``vllm serve`` with the plugin: errors, latency, memory trend, and
whether concurrent greedy answers equal the same requests served alone.

The long form of tests/test_reliability.py. The request mix (``textscythe_dev.load``): a few images,
several questions (the same image asked different questions at the same time), budgets none / 1 / 32 / 64 /
192 / 576 / 1000, several selectors, half of the requests streamed, greedy decoding.

    python benchmarks/load.py                                  # starts a tiny LLaVA-1.5 (real random weights)
    python benchmarks/load.py --requests 5000 --concurrency 32
    python benchmarks/load.py --duration 600                   # keep sending for 10 minutes
    python benchmarks/load.py --url http://host:8000 --model-name llava --server-pid 1234   # a running server

Steps: (1) every distinct request once, alone (the solo answers; skip with ``--no-solo-check``); (2) the
server's prefix, multimodal and encoder caches are reset when it allows it (``VLLM_SERVER_DEV_MODE=1``; the
server this script starts has it), so the load starts cold; (3) the load in ``--segments`` equal segments,
resident memory of the server's process group sampled after each. Prints a JSON report and a short table;
``--out`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from textscythe_dev import load  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per pass (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds: repeat passes of --requests until this much time has passed (0: one pass)")
    parser.add_argument("--segments", type=int, default=4, help="memory samples per pass (default 4)")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-solo-check", action="store_true", help="skip the solo-vs-concurrent comparison")
    parser.add_argument("--url", help="an already running server (default: start a tiny LLaVA-1.5)")
    parser.add_argument("--model-name", default="tiny-llava", help="served model name (with --url)")
    parser.add_argument("--server-pid", type=int,
                        help="with --url: the server's process-group id, for memory samples and liveness")
    parser.add_argument("--model", type=Path, help="model directory to serve (default: build a tiny LLaVA-1.5)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.segments < 1:
        parser.error("--requests, --concurrency and --segments must be >= 1")
    return args


def _post(base_url: str, path: str) -> bool:
    request = urllib.request.Request(f"{base_url}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60):
            return True
    except (urllib.error.URLError, OSError):
        return False


async def drive(args: argparse.Namespace, base_url: str, model: str, pgid: int | None) -> dict[str, Any]:
    import openai

    images = load.default_images(args.images)
    distinct = load.distinct_specs(num_images=len(images), seed=args.seed)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    pids_at_start = load.process_group(pgid) if pgid else None
    rss: list[dict[str, Any]] = []

    def sample(label: str) -> None:
        if pgid:
            by_process = load.group_rss_by_process_mib(pgid)
            rss.append({"label": label, "mib": round(sum(by_process.values()), 1), "by_process": by_process})

    sample("start")
    solo: dict[tuple, load.Outcome] = {}
    if not args.no_solo_check:
        for spec in distinct:
            solo[spec.key()] = await load.run_one(client, model, spec, images, args.max_tokens)
    caches_reset = all(_post(base_url, path) for path in
                       ("/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache"))
    sample("warm (after the solo run)")

    outcomes: list[load.Outcome] = []
    started = time.perf_counter()
    passes = 0
    per_segment = math.ceil(args.requests / args.segments)
    while True:
        mix = load.request_mix(args.requests, distinct, seed=args.seed + passes)
        for segment in range(args.segments):
            part = mix[segment * per_segment:(segment + 1) * per_segment]
            if part:
                outcomes += await load.run_requests(client, model, part, images, args.concurrency, args.max_tokens)
                sample(f"pass {passes + 1} segment {segment + 1} ({len(outcomes)} requests)")
        passes += 1
        if time.perf_counter() - started >= args.duration:
            break
    seconds = time.perf_counter() - started
    await client.close()

    errors = [outcome for outcome in outcomes if outcome.error]
    solo_errors = [outcome for outcome in solo.values() if outcome.error]
    mismatched = load.mismatches([o for o in outcomes if o.error is None], solo) if solo and not solo_errors else []
    report: dict[str, Any] = {
        "requests": len(outcomes), "distinct_requests": len(distinct), "concurrency": args.concurrency,
        "passes": passes, "seconds": round(seconds, 2), "requests_per_s": round(len(outcomes) / seconds, 2),
        "errors": len(errors), "error_examples": [o.error for o in errors[:5]],
        "solo_checked": bool(solo) and not solo_errors, "solo_errors": len(solo_errors),
        "mismatches": len(mismatched), "mismatch_examples": mismatched[:5],
        "caches_reset_before_load": caches_reset,
        **{key: round(value, 4) for key, value in load.latency_summary(outcomes).items()},
        "rss_mib": rss,
    }
    if len(rss) >= 3:  # growth from the first load sample (warm) to the last
        first, last = rss[2]["mib"], rss[-1]["mib"]
        report["rss_growth_after_warmup"] = round((last - first) / first, 4)
    if pgid:
        report["same_server_pids"] = load.process_group(pgid) == pids_at_start
    return report


def table(report: dict[str, Any]) -> str:
    rss = report["rss_mib"]
    memory = f"{rss[0]['mib']:.0f} -> {rss[-1]['mib']:.0f}" if rss else "n/a"
    growth = report.get("rss_growth_after_warmup")
    rows = [
        ("requests", report["requests"]), ("concurrency", report["concurrency"]),
        ("seconds", report["seconds"]), ("requests/s", report["requests_per_s"]), ("errors", report["errors"]),
        ("solo mismatches", report["mismatches"] if report["solo_checked"] else "not checked"),
        ("p50 latency s", report["p50_s"]), ("p95 latency s", report["p95_s"]),
        ("RSS MiB start -> end", memory),
        ("RSS growth after warm-up", "n/a" if growth is None else f"{growth:+.1%}"),
        ("same server PIDs", report.get("same_server_pids", "n/a")),
    ]
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.url:
            base_url, model, pgid = args.url.rstrip("/"), args.model_name, args.server_pid
        else:
            from textscythe_dev.server import VLLMServer

            model_dir = args.model
            if model_dir is None:
                from textscythe_dev.tiny_models import build_tiny_llava

                model_dir = build_tiny_llava(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tiny",
                                             kind="llava-1.5", with_weights=True)
            server = stack.enter_context(VLLMServer(
                model_dir,
                ["--dtype", "float32", "--enable-prefix-caching", "--max-num-seqs", str(args.concurrency),
                 "--seed", "0"],
                env={"VLLM_SERVER_DEV_MODE": "1"},
            ))
            base_url, model, pgid = server.base_url, server.model_name, server.process.pid
            print(f"started vllm serve (log: {server.log_path})", file=sys.stderr)
        report = asyncio.run(drive(args, base_url, model, pgid))
        if not args.url:
            report["server_alive"] = server.alive()
    text = json.dumps(report, indent=2)
    print(text)
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    healthy = report["errors"] == 0 and report["mismatches"] == 0 and report.get("server_alive", True)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
