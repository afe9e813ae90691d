"""Selector overhead relative to the vision encoder: is pruning cheap next to the tower it follows?

In one process, on the same inputs, time

* **encoder**: a CLIP ViT-L/14-336 vision tower (``transformers.CLIPVisionModel`` with LLaVA's
  ``CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
  num_hidden_layers=24, num_attention_heads=16)``, random init, float32), run -- as vLLM runs it for LLaVA --
  only up to the feature layer (the penultimate, ``vision_feature_layer=-2``: 23 layers; ``--full-tower``
  runs all 24): 1 view of 336 px for N = 576 (LLaVA-1.5), 5 views for N = 2880 (LLaVA-NeXT's base image
  plus 4 tiles);
* **attention**: the plugin's [CLS]-attention probe (``textscythe_vllm.probes.ClsAttentionProbe``):
  ``softmax(q_cls . K^T / sqrt(d))`` averaged over heads, on the feature layer's query and key projections,
  which forward hooks capture from the tower's own pass (nothing is recomputed, as in the plugin's hook on
  vLLM's fused QKV projection), [CLS] column dropped;
* **selector**: ``selector.select(visual, text, attention, K)`` with ``visual`` = the tower's patch features
  through a random LLaVA projector (1024 -> 4096 -> 4096, GELU; its time is reported but not counted in the
  overhead), ``text`` = T random rows (no key tokens: TextScythe's worst case, the full K-step fill).

overhead = (selector + attention) / encoder, in %, from medians over ``--repeats`` interleaved rounds (each
round times the encoder, then every selector and budget, so a load change on a shared machine hits all
alike); the same ratio from the fastest run of each part is reported next to it. Goals: <= 2% at N = 576, <= 5% at N = 2880. ``--profile`` also times TextScythe's stages (through
its public helpers, same arithmetic as ``select``) and prints the top ops of ``torch.profiler``.

    python benchmarks/selector_overhead.py --threads 2                 # N = 576, 2880; K = 64 192 320
    python benchmarks/selector_overhead.py --threads 2 --profile
    python benchmarks/selector_overhead.py --quick                    # smoke run: tiny tower and sizes

Prints Markdown tables and writes JSON (``--out``, default benchmarks/results/selector_overhead.json), the
tables next to it (``.md``) and a bar chart of the overhead (``.png``).
"""

from __future__ import annotations

import argparse
import math
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

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "selector_overhead.json"
GOALS = {576: 2.0, 2880: 5.0}  # overhead goals in %, per N
IMAGE_SIZE, PATCH = 336, 14
PATCHES_PER_VIEW = (IMAGE_SIZE // PATCH) ** 2  # 576


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="visual tokens N, multiples of 576 (default 576 2880: 1 and 5 views)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="budgets K (default 64 192 320)")
    parser.add_argument("--dim", type=int, default=4096, help="projected (LLM) hidden size D (default 4096)")
    parser.add_argument("--text-tokens", type=int, default=40, help="instruction tokens T (default 40)")
    parser.add_argument("--selectors", nargs="+", default=["textscythe"], help="selectors (default textscythe)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (the goals assume 2)")
    parser.add_argument("--full-tower", action="store_true", help="time all 24 layers, not the 23 vLLM runs")
    parser.add_argument("--profile", action="store_true", help="time TextScythe's stages and run torch.profiler")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a 2-layer, 64-wide tower, N=576, K=64, D=256, 2 repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the tower, the projector and the selectors run (default cpu)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([576] if args.quick else [576, 2880])
    args.budgets = args.budgets or ([64] if args.quick else [64, 192, 320])
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.quick and args.dim == 4096:
        args.dim = 256
    unknown = sorted(set(args.selectors) - set(available_selectors()))
    if unknown:
        parser.error(f"unknown selectors {unknown}; available: {available_selectors()}")
    if any(n < 1 or n % PATCHES_PER_VIEW for n in args.sizes):
        parser.error(f"--sizes must be multiples of {PATCHES_PER_VIEW} (one 336 px view each)")
    if min(args.budgets) < 1 or args.repeats < 1 or args.warmup < 0 or args.dim < 1 or args.text_tokens < 0:
        parser.error("--budgets, --repeats, --dim must be >= 1 and --warmup, --text-tokens >= 0")
    return args


# ---------------------------------------------------------------------------------------------- the tower
def build_tower(quick: bool, full_tower: bool):
    """CLIP ViT-L/14-336 (random init, float32, eval), cut after the feature layer unless ``full_tower``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if quick:
        config = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2)
    else:
        config = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=1024,
                                  intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    model = CLIPVisionModel(config).eval()
    encoder = encoder_of(model)
    if not full_tower:  # vLLM builds LLaVA's tower only up to vision_feature_layer = -2
        encoder.layers = encoder.layers[: config.num_hidden_layers - 1]
    return model


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``CLIPEncoder`` (transformers 5 dropped the ``vision_model`` level of ``CLIPVisionModel``)."""
    return getattr(model, "vision_model", model).encoder


class QKCapture:
    """Forward hooks on the feature layer's ``q_proj`` / ``k_proj``: keep their outputs (computed anyway)."""

    def __init__(self, attention: torch.nn.Module) -> None:
        self.attention = attention
        self.query: torch.Tensor | None = None
        self.key: torch.Tensor | None = None
        self.enabled = False
        attention.q_proj.register_forward_hook(self._on_query)
        attention.k_proj.register_forward_hook(self._on_key)

    def _on_query(self, module, args, output) -> None:
        if self.enabled:
            self.query = output

    def _on_key(self, module, args, output) -> None:
        if self.enabled:
            self.key = output


def cls_attention(query: torch.Tensor, key: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The plugin's probe arithmetic: ``[B, S, h*d]`` q/k -> ``[B * (S - 1)]`` [CLS] attention, heads averaged."""
    batch, seq_len, width = key.shape
    head_dim = width // num_heads
    cls_query = query[:, 0].float().reshape(batch, num_heads, head_dim)
    keys = key.float().reshape(batch, seq_len, num_heads, head_dim)
    scores = torch.einsum("bhd,bshd->bhs", cls_query, keys) * scale
    attention = torch.softmax(scores, dim=-1).sum(dim=1) / num_heads  # [B, S]
    return attention[:, 1:].reshape(-1)  # the features drop [CLS]; views in order


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, *args):
    """``(result, ms)``; on CUDA the time runs from a synchronised start to the finished kernels."""
    _synchronize()
    started = time.perf_counter()
    result = fn(*args)
    _synchronize()
    return result, (time.perf_counter() - started) * 1e3


# ----------------------------------------------------------------------------------------------- profiling
def textscythe_stages(visual: torch.Tensor, text: torch.Tensor, attention: torch.Tensor, k: int,
                      repeats: int) -> dict[str, object]:
    """Median ms of each stage of ``TextScytheSelector.select`` (float32 inputs), via its public helpers."""
    from textscythe_vllm.selectors.base import greedy_diverse_fill, l2_normalize, minmax_normalize
    from textscythe_vllm.selectors.textscythe import TextScytheSelector

    selector = TextScytheSelector()
    stages: dict[str, list[float]] = {}

    def stage(name, fn, *args):
        result, ms = timed(fn, *args)
        stages.setdefault(name, []).append(ms)
        return result

    for _ in range(repeats):
        stage("input check (finite sums)", TextScytheSelector._check_inputs, visual, text, attention)
        unit = stage("L2-normalise visual [N, D]", l2_normalize, visual)
        _key, relevant, _strength = stage("steps 1-5: similarity, ER, thresholds", selector.relevant_tokens, unit, text)
        num_relevant = int(relevant.sum())
        importance = stage("min-max attention", minmax_normalize, attention, visual.shape[0], visual)
        picked = stage("step 7: greedy diverse fill", greedy_diverse_fill, unit, importance, ~relevant,
                       k - num_relevant)
        chosen = torch.cat([relevant.nonzero().squeeze(1), picked])
        stage("sort + gather rows", lambda c: visual[torch.sort(c).values], chosen)
    minima = {name: min(times) for name, times in stages.items()}
    return {"stages_ms": minima, "total_ms": sum(minima.values()),
            "stages_median_ms": {name: statistics.median(times) for name, times in stages.items()},
            "repeats": repeats, "relevant_tokens": num_relevant, "fill_steps": k - num_relevant}


def profiler_table(visual, text, attention, k: int, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    selector = get_selector("textscythe")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        selector.select(visual, text, attention, k)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ------------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict[str, object]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    tower = build_tower(args.quick, args.full_tower).to(device)
    config = tower.config
    feature_attention = encoder_of(tower).layers[-1].self_attn
    capture = QKCapture(feature_attention)
    projector = torch.nn.Sequential(torch.nn.Linear(config.hidden_size, args.dim), torch.nn.GELU(),
                                    torch.nn.Linear(args.dim, args.dim)).eval().to(device)
    selectors = {name: get_selector(name) for name in args.selectors}

    results, encoder_rows, profiles = [], [], {}
    with torch.inference_mode():
        for num_visual in args.sizes:
            views = num_visual // PATCHES_PER_VIEW
            pixels = torch.randn(views, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(device)
            text = torch.randn(args.text_tokens, args.dim, generator=gen).to(device)
            capture.enabled = True
            hidden = tower(pixel_values=pixels).last_hidden_state  # [views, 577, C]
            capture.enabled = False
            query, key = capture.query, capture.key
            visual = projector(hidden[:, 1:].reshape(num_visual, -1))  # [N, D] projected patch features
            attention = cls_attention(query, key, feature_attention.num_heads, feature_attention.scale)
            budgets = [k for k in args.budgets if k < num_visual]

            encoder_ms, projector_ms, attention_ms = [], [], []
            selector_ms: dict[tuple[str, int], list[float]] = {(n, k): [] for n in selectors for k in budgets}
            for round_index in range(args.warmup + args.repeats):
                samples: dict[object, float] = {}  # this round's times; warm-up rounds are dropped
                _, samples["encoder"] = timed(tower, pixels)
                _, samples["projector"] = timed(projector, hidden[:, 1:].reshape(num_visual, -1))
                _, samples["attention"] = timed(cls_attention, query, key, feature_attention.num_heads,
                                                feature_attention.scale)
                for name, k in selector_ms:
                    out, samples[(name, k)] = timed(selectors[name].select, visual, text, attention, k)
                    assert out.indices.numel() == k
                if round_index >= args.warmup:
                    encoder_ms.append(samples.pop("encoder"))
                    projector_ms.append(samples.pop("projector"))
                    attention_ms.append(samples.pop("attention"))
                    for point, ms in samples.items():
                        selector_ms[point].append(ms)
                print(f"  N={num_visual} round {round_index + 1}/{args.warmup + args.repeats}: encoder "
                      f"{samples.get('encoder', encoder_ms[-1] if encoder_ms else 0):.0f} ms",
                      file=sys.stderr, flush=True)

            encoder = statistics.median(encoder_ms)
            probe = statistics.median(attention_ms)
            encoder_rows.append({
                "N": num_visual, "views": views, "encoder_ms": encoder, "encoder_times_ms": encoder_ms,
                "projector_ms": statistics.median(projector_ms), "attention_ms": probe,
                "attention_times_ms": attention_ms,
            })
            for (name, k), times in selector_ms.items():
                select = statistics.median(times)
                overhead = 100 * (select + probe) / encoder
                goal = None if args.quick else GOALS.get(num_visual)  # the goals are for the real tower
                results.append({
                    "selector": name, "N": num_visual, "K": k, "D": args.dim, "T": args.text_tokens,
                    "selector_ms": select, "selector_min_ms": min(times), "selector_times_ms": times,
                    "attention_ms": probe, "encoder_ms": encoder,
                    "overhead_pct": overhead, "goal_pct": goal, "goal_met": None if goal is None else overhead <= goal,
                    # the same ratio from the fastest run of each part: less sensitive to a busy machine
                    "overhead_min_pct": 100 * (min(times) + min(attention_ms)) / min(encoder_ms),
                })
            if args.profile:
                profiles[str(num_visual)] = {
                    str(k): {**textscythe_stages(visual, text, attention, k, max(5, 2 * args.repeats)),
                             "profiler": profiler_table(visual, text, attention, k)}
                    for k in budgets
                }
    return {
        "config": {
            "sizes": args.sizes, "budgets": args.budgets, "dim": args.dim, "text_tokens": args.text_tokens,
            "selectors": args.selectors, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
            "tower": {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                      "layers_run": len(encoder_of(tower).layers), "heads": config.num_attention_heads,
                      "image_size": IMAGE_SIZE, "patch_size": PATCH, "dtype": "float32",
                      "attn_implementation": getattr(config, "_attn_implementation", None)},
            "quick": args.quick,
        },
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        },
        "encoder": encoder_rows,
        "results": results,
        "textscythe_profile": profiles,
    }


# ------------------------------------------------------------------------------------------------- output
def markdown_table(report: dict[str, object]) -> str:
    lines = [
        "| N | views | encoder (ms) | projector (ms) | [CLS] attention (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in report["encoder"]:
        lines.append(f"| {row['N']} | {row['views']} | {row['encoder_ms']:.0f} | {row['projector_ms']:.0f} "
                     f"| {row['attention_ms']:.2f} |")
    lines += [
        "",
        "| selector | N | K | selector (ms) | + attention (ms) | overhead vs encoder | goal | met "
        "| selector, fastest run (ms) | overhead, fastest runs |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in report["results"]:
        goal = "–" if row["goal_pct"] is None else f"<= {row['goal_pct']:g}%"
        met = "–" if row["goal_met"] is None else ("yes" if row["goal_met"] else "**no**")
        lines.append(f"| {row['selector']} | {row['N']} | {row['K']} | {row['selector_ms']:.1f} "
                     f"| {row['attention_ms']:.2f} | {row['overhead_pct']:.2f}% | {goal} | {met} "
                     f"| {row['selector_min_ms']:.1f} | {row['overhead_min_pct']:.2f}% |")
    for size, by_budget in report["textscythe_profile"].items():
        budgets = list(by_budget)
        names = list(next(iter(by_budget.values()))["stages_ms"])
        lines += [
            "",
            f"TextScythe stages at N={size} (ms, fastest of {next(iter(by_budget.values()))['repeats']} runs)",
            "",
            "| stage | " + " | ".join(f"K={k}" for k in budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(f"{by_budget[k]['stages_ms'][name]:.1f}" for k in budgets) + " |")
        lines.append("| **sum of stages** | " + " | ".join(f"{by_budget[k]['total_ms']:.1f}" for k in budgets) + " |")
        lines.append("| fill steps (K - relevant) | " + " | ".join(str(by_budget[k]["fill_steps"]) for k in budgets)
                     + " |")
    return "\n".join(lines)


def plot(report: dict[str, object], path: Path) -> None:
    plt = pyplot()
    results = report["results"]
    sizes = sorted({r["N"] for r in results})
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.8), squeeze=False)
    names = list(dict.fromkeys(r["selector"] for r in results))
    for axis, size in zip(axes[0], sizes, strict=True):
        budgets = sorted({r["K"] for r in results if r["N"] == size})
        width = 0.8 / len(budgets)
        for b, k in enumerate(budgets):
            rows = {r["selector"]: r for r in results if (r["N"], r["K"]) == (size, k)}
            xs = [i + (b - (len(budgets) - 1) / 2) * width for i in range(len(names))]
            bars = axis.bar(xs, [rows[n]["overhead_pct"] if n in rows else 0 for n in names], width, label=f"K={k}")
            for bar, name in zip(bars, names, strict=True):
                if name in rows and rows[name]["goal_met"] is False:
                    bar.set_hatch("//")
        if not report["config"]["quick"] and GOALS.get(size) is not None:
            axis.axhline(GOALS[size], color="black", linestyle="--", linewidth=1, label=f"goal {GOALS[size]:g}%")
        axis.legend(fontsize=8)
        axis.set_xticks(range(len(names)), names)
        axis.set_ylabel("(selector + attention) / encoder (%)")
        axis.set_title(f"N={size}, encoder {next(e['encoder_ms'] for e in report['encoder'] if e['N'] == size):.0f} ms")
        axis.grid(axis="y", alpha=0.3)
    env = report["environment"]
    figure.suptitle(f"CPU float32, {env['torch_threads']} threads ({env['cpu_count']} CPUs); hatched: over the goal", fontsize=9)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    table = markdown_table(report)
    env, tower = report["environment"], report["config"]["tower"]
    header = (f"Selector + [CLS] attention vs CLIP-L/14-336 encoder ({tower['layers_run']} layers, float32), "
              f"D={args.dim}, T={args.text_tokens}, median of {args.repeats}; torch {env['torch']}, "
              f"{env['cpu_count']} CPUs / {env['torch_threads']} threads")
    show(header, table)
    for size, by_budget in report["textscythe_profile"].items():
        k = max(by_budget, key=int)
        print(f"\ntorch.profiler, TextScythe N={size} K={k}:\n{by_budget[k]['profiler']}")
    write_report(args.out, report, header, table, None if args.no_plot else plot)
    return 0 if all(math.isfinite(r["overhead_pct"]) for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
