"""What the attention probe costs per image, i.e. what selectors that read no attention save.

Selectors declare what they read (``uses_text``, ``uses_attention``). When no selector of a batch reads the
tower's attention (``uniform``, ``random``, ``divprune``, ``dart``), the model runs without the probe; when it reads
no text, the instruction is not embedded. This script times the probe's arithmetic on each family's real tower
shapes, with the plugin's own functions, on random q/k of those shapes:

* **[CLS] attention** (CLIP-L/14-336, LLaVA-1.5 / LLaVA-NeXT): ``ClsAttentionProbe.scores`` on ``[views, 577, 3 x
  1024]`` QKV, 16 heads -- 1 view (576 tokens) and 5 views (LLaVA-NeXT's 2,880);
* **mean received attention** (SigLIP-so400m/14-384, LLaVA-OneVision; Qwen2.5-VL's ViT full-attention layer):
  ``mean_received_attention`` over each view's queries -- 1 and 10 views of 729 tokens (SigLIP: 16 heads of
  72); 1,024 and 4,096 patches (Qwen2.5-VL: 16 heads of 80).

    python benchmarks/probe_savings.py [--repeats 5] [--out benchmarks/results/probe_savings.json]

Writes JSON, the Markdown table next to it (``.md``) and a bar chart (``.png``); prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS_DIR))

from _report import REPO_ROOT, pyplot, save_figure, show, write_report  # noqa: E402

from textscythe_vllm.probes import ClsAttentionProbe, mean_received_attention  # noqa: E402

CASES = [  # (family, probe, views, tokens per view, heads, head dim)
    ("LLaVA-1.5 (CLIP-L, 576)", "cls", 1, 577, 16, 64),
    ("LLaVA-NeXT (CLIP-L, 5 views, 2,880)", "cls", 5, 577, 16, 64),
    ("OneVision (SigLIP, 1 view, 729)", "mean", 1, 729, 16, 72),
    ("OneVision (SigLIP, 10 views, 7,290)", "mean", 10, 729, 16, 72),
    ("Qwen2.5-VL (1,024 patches)", "mean", 1, 1024, 16, 80),
    ("Qwen2.5-VL (4,096 patches)", "mean", 1, 4096, 16, 80),
]


def time_case(probe: str, views: int, tokens: int, heads: int, head_dim: int, repeats: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    if probe == "cls":
        attention = SimpleNamespace(num_heads_per_partition=heads, head_dim=head_dim, scale=head_dim**-0.5,
                                    tp_size=1, num_heads=heads)
        runner = ClsAttentionProbe.__new__(ClsAttentionProbe)
        runner._attention = attention
        qkv = torch.randn(views, tokens, 3 * heads * head_dim, generator=generator)

        def run() -> None:
            runner.scores(qkv)
    else:
        query = torch.randn(views, tokens, heads, head_dim, generator=generator)
        key = torch.randn(views, tokens, heads, head_dim, generator=generator)

        def run() -> None:
            for view in range(views):
                mean_received_attention(query[view], key[view], head_dim**-0.5)
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - started))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "probe_savings.json")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for family, probe, views, tokens, heads, head_dim in CASES:
        times = time_case(probe, views, tokens, heads, head_dim, args.repeats)
        rows.append({"family": family, "probe": probe, "views": views, "tokens_per_view": tokens,
                     "heads": heads, "head_dim": head_dim, "median_ms": statistics.median(times), "times_ms": times})
    report = {"config": {"repeats": args.repeats},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "rows": rows}
    header = (f"Attention-probe time per image (ms, median of {args.repeats}; float32, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads): what `uniform`, `random`, `divprune` and "
              "`dart` no longer pay")
    table = "\n".join(["| family (tower, tokens) | probe | ms per image |", "|---|---|---:|"] + [
        f"| {row['family']} | {'[CLS] attention' if row['probe'] == 'cls' else 'mean received attention'} | "
        f"{row['median_ms']:.2f} |" for row in rows])
    show(header, table)

    def plot(report: dict, path: Path) -> None:
        plt = pyplot()
        figure, axis = plt.subplots(figsize=(8, 3.5))
        axis.barh([row["family"] for row in report["rows"]], [row["median_ms"] for row in report["rows"]])
        axis.set_xscale("log")
        axis.set_xlabel("probe time per image (ms, log scale)")
        save_figure(figure, path)

    write_report(args.out, report, header, table, None if args.no_plot else plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
