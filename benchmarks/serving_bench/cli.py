"""The command line: ``python benchmarks/serving.py [options]`` (see the package's docstring and
docs/benchmarks.md section 5)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _report import REPO_ROOT

from . import __doc__ as PACKAGE_DOC
from .analysis import summarise
from .client import run
from .flops import DEFAULT_LLM_LAYERS, SHAPES, default_llm_layers, family
from .report import write

RESULTS = REPO_ROOT / "benchmarks" / "results"
SELECTOR = "textscythe"
#: The control requests' selector: evenly spaced rows, no text, no attention -- pruning at (almost) no cost.
CONTROL_SELECTOR = "uniform"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5")
    parser.add_argument("--llm-layers", type=int, default=None,
                        help=f"LLM layers served (of 32; default {DEFAULT_LLM_LAYERS}; qwen3-vl-8b: 6 of 36; --quick: 2 "
                             "of a tiny LLM)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="CLIP layers run (of 23; qwen3-vl-8b: ViT blocks, 3..27; default: the count that keeps "
                             "the real vision/LLM FLOP ratio)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="budgets K (default 192 128 64; llava-next 320; qwen3-vl-8b 256 102)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed single-stream rounds (default 12; llava-next 9; qwen3-vl-8b 8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=None,
                        help="concurrency levels (default 1 4 16; llava-next, qwen3-vl-8b 4); each runs pruned and "
                             "unpruned")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per concurrency level and mode (default max(6, 2 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 8)")
    parser.add_argument("--selector", default=SELECTOR, help=f"visual_token_selector (default {SELECTOR})")
    parser.add_argument("--control-selector", default=CONTROL_SELECTOR,
                        help="near-free selector of the control requests (same image pruned to the same K; default "
                             f"{CONTROL_SELECTOR}); '' for none")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny widths, budgets none/64, 2 rounds, concurrency 1 4 with 4 requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/serving*.json)")
    parser.add_argument("--server-log", type=Path, default=None, help="vllm serve's log (default: a temp file)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--reanalyse", type=Path, default=None, metavar="JSON",
                        help="no server: rebuild the analysis, tables and plot from a saved report's measurements")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.quick:
        args.budgets = args.budgets or [64]
        args.rounds = args.rounds or 2
        args.concurrency = [1, 4] if args.concurrency is None else args.concurrency
        args.requests = args.requests or 4
        args.max_tokens = args.max_tokens or 4
        args.llm_layers = args.llm_layers or 2
    args.budgets = args.budgets or list(shape["budgets"])
    args.rounds = args.rounds or shape["rounds"]
    args.concurrency = list(shape["concurrency"]) if args.concurrency is None else args.concurrency
    args.max_tokens = args.max_tokens or 8
    args.llm_layers = args.llm_layers or default_llm_layers(args.shape)
    args.out = args.out or RESULTS / shape["out"]
    if min(args.budgets) < 1 or len(set(args.budgets)) != len(args.budgets):
        parser.error("--budgets must be distinct and >= 1")
    if args.rounds < 1 or args.warmup < 0 or args.max_tokens < 1 or args.llm_layers < 1:
        parser.error("--rounds, --max-tokens, --llm-layers must be >= 1 and --warmup >= 0")
    if any(c < 1 for c in args.concurrency) or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be >= 1")
    low, high = family(args.shape).vision_layer_range
    if args.vision_layers is not None and not low <= args.vision_layers <= high:
        parser.error(f"--vision-layers must be in {low}..{high}")
    from textscythe_vllm.selectors import available_selectors

    if args.control_selector and args.control_selector not in available_selectors():
        parser.error(f"--control-selector must be one of {available_selectors()} or ''")
    if args.control_selector == args.selector:
        parser.error("--control-selector must differ from --selector")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # --reanalyse: the tables and the plot again from a saved report's raw measurements
    report = summarise(json.loads(args.reanalyse.read_text()) if args.reanalyse is not None else run(args))
    write(report, args.out, with_plot=not args.no_plot)
    if report["errors"] or any(lv[m]["errors"] for lv in report["concurrency"] for m in ("pruned", "unpruned")):
        print(f"requests failed, e.g. {report['error_examples'][:1]}", file=sys.stderr)
        return 1
    return 0
