"""Latency of every visual-token selector, one image at a time.

For each selector in :func:`textscythe_vllm.selectors.available_selectors`, each visual sequence length N
(576 = LLaVA-1.5, 2880 = LLaVA-NeXT), each budget K and each device/dtype, time ``selector.select(visual,
text, attention, K)`` on random inputs (``visual [N, D]``, ``text [T, D]``, ``attention [N]`` a softmax) and
report the median over ``--repeats`` runs after ``--warmup`` untimed ones. Inputs in float32 and bfloat16 (the
dtype vLLM serves in; selectors score in float32 either way). CUDA runs are bracketed by
``torch.cuda.synchronize()``. Random text has (almost) no key tokens, so TextScythe runs its full K-step
supplementation loop -- its worst case.

    python benchmarks/selector_latency.py                      # full default grid, CPU (+ CUDA if present)
    python benchmarks/selector_latency.py --quick              # smoke run
    python benchmarks/selector_latency.py --sizes 576 --budgets 64 --selectors textscythe divprune
    python benchmarks/selector_latency.py --vs-encoder --threads 2     # overhead vs the CLIP-L encoder

``--vs-encoder`` measures what pruning costs next to the tower it follows -- selector + [CLS]-attention time
against the CLIP-L/14-336 encoder, same process, same inputs, interleaved rounds, with the goals (<= 2% at
N = 576, <= 5% at N = 2880) -- by running ``benchmarks/selector_overhead.py`` with the remaining arguments
(default selector: textscythe; results ``benchmarks/results/selector_overhead.*``).

Prints a Markdown table and writes JSON, the table (``.md``) and a plot (``.png``) (``--out``, default
benchmarks/results/selector_latency.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:  # the shared report writer, also when this file is loaded by path
    sys.path.insert(0, str(BENCHMARKS_DIR))

from _report import REPO_ROOT, pyplot, save_figure, show, write_report  # noqa: E402

from textscythe_vllm.selectors import available_selectors, get_selector  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "selector_latency.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="visual tokens N (default 576 2880)")
    parser.add_argument("--dim", type=int, default=4096, help="hidden size D (default 4096)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="budgets K (default 64 192 320)")
    parser.add_argument("--text-tokens", type=int, default=40, help="instruction tokens T (default 40)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point (default 5 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--selectors", nargs="+", default=None, help="subset of selectors (default: all)")
    parser.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="default: cpu, plus cuda when available")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="input dtypes (default float32 bfloat16; float32 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=576, K=64, 2 repeats unless the flags above say otherwise")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"JSON output; the table and plot go next to it (default {DEFAULT_OUT})")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--vs-encoder", action="store_true",
                        help="overhead vs the vision encoder instead (benchmarks/selector_overhead.py; see its --help)")
    args = parser.parse_args(argv)

    if args.sizes is None:
        args.sizes = [576] if args.quick else [576, 2880]
    if args.budgets is None:
        args.budgets = [64] if args.quick else [64, 192, 320]
    if args.quick and args.repeats is None:
        args.repeats = 2
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
    unknown = sorted(set(args.selectors or []) - set(available_selectors()))
    if unknown:
        parser.error(f"unknown selectors {unknown}; available: {available_selectors()}")
    args.selectors = args.selectors or available_selectors()
    if args.devices is None:
        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda requested but torch.cuda.is_available() is False")
    for name in ("dim", "text_tokens", "warmup"):
        if getattr(args, name) < (1 if name == "dim" else 0):
            parser.error(f"--{name.replace('_', '-')} is out of range")
    if min(args.sizes) < 1 or min(args.budgets) < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--sizes, --budgets and --repeats must be >= 1")
    return args


def make_inputs(num_visual: int, dim: int, num_text: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(num_visual, dim, generator=gen)
    text = torch.randn(num_text, dim, generator=gen)
    attention = torch.softmax(torch.randn(num_visual, generator=gen) * 2.0, dim=0)
    return visual, text, attention


def time_selector(selector, inputs, budget: int, device: str, repeats: int, warmup: int) -> list[float]:
    visual, text, attention = inputs
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        selector.select(visual, text, attention, budget)
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = selector.select(visual, text, attention, budget)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        assert out.indices.numel() == min(budget, visual.shape[0])
    return times


def environment(args: argparse.Namespace) -> dict[str, object]:
    env: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = []
    for device in args.devices:
        dtypes = [DTYPES[name] for name in args.dtypes]
        repeats = args.repeats or (20 if device == "cuda" else 5)
        for dtype in dtypes:
            for num_visual in args.sizes:
                base = make_inputs(num_visual, args.dim, args.text_tokens, args.seed)
                inputs = tuple(t.to(device=device, dtype=dtype) for t in base)
                for budget in args.budgets:
                    for name in args.selectors:
                        times = time_selector(get_selector(name), inputs, budget, device, repeats, args.warmup)
                        entry = {
                            "selector": name,
                            "device": device,
                            "dtype": str(dtype).removeprefix("torch."),
                            "N": num_visual,
                            "D": args.dim,
                            "T": args.text_tokens,
                            "K": budget,
                            "repeats": repeats,
                            "median_ms": statistics.median(times),
                            "min_ms": min(times),
                            "times_ms": times,
                        }
                        results.append(entry)
                        print(f"  {device:4s} {entry['dtype']:8s} N={num_visual:5d} K={budget:4d} "
                              f"{name:14s} {entry['median_ms']:10.3f} ms", file=sys.stderr, flush=True)
    return {
        "config": {
            "sizes": args.sizes, "dim": args.dim, "budgets": args.budgets, "text_tokens": args.text_tokens,
            "warmup": args.warmup, "seed": args.seed, "devices": args.devices, "dtypes": args.dtypes,
            "selectors": args.selectors,
        },
        "environment": environment(args),
        "results": results,
    }


def markdown_table(report: dict[str, object]) -> str:
    """One Markdown table per device/dtype: a row per selector, a column per (N, K)."""
    results = report["results"]
    by_key = {(r["selector"], r["device"], r["dtype"], r["N"], r["K"]): r["median_ms"] for r in results}
    tables = []
    for device, dtype in sorted({(r["device"], r["dtype"]) for r in results}, key=lambda c: (c[0] != "cpu", c)):
        columns = sorted({(r["N"], r["K"]) for r in results if (r["device"], r["dtype"]) == (device, dtype)})
        lines = [
            f"**{device}, {dtype}** -- median ms",
            "",
            "| selector | " + " | ".join(f"N={n} K={k}" for n, k in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for name in report["config"]["selectors"]:
            cells = [by_key.get((name, device, dtype, n, k)) for n, k in columns]
            lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def plot(report: dict[str, object], path: Path) -> None:
    """One panel per (device, dtype, N): median ms per selector, a bar per K, log scale."""
    plt = pyplot()
    results = report["results"]
    panels = sorted({(r["device"], r["dtype"], r["N"]) for r in results}, key=lambda p: (p[0] != "cpu", p))
    selectors = report["config"]["selectors"]
    budgets = sorted({r["K"] for r in results})
    median = {(r["selector"], r["device"], r["dtype"], r["N"], r["K"]): r["median_ms"] for r in results}
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    width = 0.8 / len(budgets)
    for axis, (device, dtype, num_visual) in zip(axes[:, 0], panels, strict=True):
        for offset, budget in enumerate(budgets):
            heights = [median.get((name, device, dtype, num_visual, budget), 0.0) for name in selectors]
            axis.bar([i + offset * width for i in range(len(selectors))], heights, width, label=f"K={budget}")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(selectors))], selectors, fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("median ms")
        axis.set_title(f"{device} {dtype}, N={num_visual}", fontsize=9)
        axis.legend(fontsize=7)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--vs-encoder" in argv:
        import selector_overhead

        return selector_overhead.main([arg for arg in argv if arg != "--vs-encoder"])
    args = parse_args(argv)
    report = run(args)
    env = report["environment"]
    header = (f"Median latency (ms) of selector.select(), D={args.dim}, T={args.text_tokens}; "
              f"torch {env['torch']}, {env['cpu_count']} CPUs / {env['torch_threads']} threads"
              + (f", {env['cuda_device']}" if "cuda_device" in env else ""))
    table = markdown_table(report)
    show(header, table)
    write_report(args.out, report, header, table, None if args.no_plot else plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
