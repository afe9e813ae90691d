"""The output: the Markdown tables (:func:`markdown_table`), the header line, the plot, and writing the JSON,
the ``.md`` and the ``.png`` through the benchmarks' shared writer (``benchmarks/_report.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _report import pyplot, save_figure, show, write_report

from .analysis import NO_BUDGET
from .flops import family


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{1000 * value:,.0f}"


def _x(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _range(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``min–max`` of per-round values (``–`` when there are none)."""
    return f"{scale * min(values):,.{digits}f}–{scale * max(values):,.{digits}f}" if values else "–"


def markdown_table(report: dict[str, Any]) -> str:
    config, rows = report["config"], report["single_stream"]
    n, t = config["visual_tokens_N"], config["text_tokens_T"]
    fam = family(config["shape"])
    lines = [
        f"TTFT, prefill and end-to-end latency per budget (ms, medians of {config['rounds']} interleaved rounds); "
        "bound (b), the gap TTFT(K) - (b) and the vision encoder are medians of per-round differences between "
        "neighbouring requests; TTFT / bound (b) = 1 + gap / (b); "
        f"ideal (a) = TTFT(none) x FLOPs(K) / FLOPs(none); bound (b) = TTFT(none) - [TTFT_text(T+N) - "
        f"TTFT_text(T+K)], T = {t}, N = {n}",
        "",
        f"| budget | prompt tokens | TTFT | prefill | e2e | TTFT / TTFT(none) | ratio (a) | ratio (a), real {fam.size} "
        "| ratio (b) | ideal (a) | bound (b) | TTFT / bound (b) | per round (min–max) | within 10% of (b) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        within = "–" if r["within_10pct_of_b"] is None else ("yes" if r["within_10pct_of_b"] else "**no**")
        spread = _range(r["ttft_over_bound_b_per_round"]) if r["budget"] != NO_BUDGET else "–"
        lines.append(
            f"| {r['budget']} | {r['prompt_tokens']} | {_ms(r['ttft_s'])} | {_ms(r['prefill_s'])} | {_ms(r['e2e_s'])} "
            f"| {_x(r['ratio_measured'])} | {_x(r['ratio_a'])} | {_x(r['ratio_a_real_model'])} | {_x(r['ratio_b'])} "
            f"| {_ms(r['ideal_a_s'])} | {_ms(r['bound_b_s'])} | {_x(r['ttft_over_bound_b'])} | {spread} | {within} |")
    controls = [r for r in rows if r.get("control")]
    if controls:
        lines += [
            "",
            f"Cross-check with a near-free selector: the same request pruned to the same K by "
            f"`{config.get('control_selector')}` (no text, no attention), sent next to it in every round. Bound (c) "
            "= TTFT(control) - its selector time: the image path plus a T+K prefill, measured directly between "
            "neighbours of K-sized requests, where (b) subtracts two T+N prefills (whose noise is the size of the "
            "bound at high N). TTFT / bound (c) = 1 + median gap / median (c).",
            "",
            "| budget | TTFT | TTFT (control) | TTFT - TTFT (control) | bound (b) | (b) per round | bound (c) "
            "| (c) per round | TTFT / bound (c) | per round |",
            "|---|---:|---:|---:|---:|---|---:|---|---:|---|",
        ]
        for r in controls:
            c = r["control"]
            lines.append(
                f"| {r['budget']} | {_ms(r['ttft_s'])} | {_ms(c['ttft_s'])} | {_ms(c['ttft_minus_control_s'])} "
                f"| {_ms(r['bound_b_s'])} | {_range(c['bound_b_per_round_s'], 1000.0, 0)} | {_ms(c['bound_c_s'])} "
                f"| {_range(c['bound_c_per_round_s'], 1000.0, 0)} | {_x(c['ttft_over_bound_c'])} "
                f"| {_range(c['ttft_over_bound_c_per_round'])} |")
    lines += [
        "",
        "Components of TTFT (ms, medians): request overhead = TTFT - vLLM prefill time; vision encoder = "
        "prefill(image, none) - prefill(text, T+N), per round; attention = the plugin's probe (in-process); selector = worker "
        "selector metric - attention; LLM prefill = prefill(text, T+K); residual = the rest of the image request's "
        "prefill, relative to budget none",
        "",
        "| budget | TTFT | request overhead | vision encoder | attention extraction | selector | LLM prefill | residual |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["components_s"]
        lines.append(f"| {r['budget']} | {_ms(r['ttft_s'])} | {_ms(c['request_overhead'])} | {_ms(c['vision_encoder'])} "
                     f"| {_x(None if c['attention_extraction'] is None else 1000 * c['attention_extraction'], 1)} "
                     f"| {_x(None if c['selector'] is None else 1000 * c['selector'], 1)} | {_ms(c['llm_prefill'])} "
                     f"| {_ms(c['residual'])} |")
    lines += [
        "",
        "Gap TTFT(K) - bound (b) by component (ms, medians of per-round values; % of bound (b)). Vision encoder: "
        "0 by construction (the same tower runs at every budget, so (b) contains it). Last column: attention + "
        "selector + request overhead (the costs that do not grow with depth) against bound (b) with the LLM "
        "prefill and the vision encoder scaled to the real model's depth (a projection, not a measurement).",
        "",
        "| budget | gap | % of (b) | request overhead | vision encoder | attention extraction | selector "
        "| LLM prefill (residual) | fixed costs at real depth, % of (b) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["gap_components_s"]
        if g is None:
            continue
        share = None if not r["bound_b_s"] or r["gap_b_s"] is None else 100 * r["gap_b_s"] / r["bound_b_s"]
        projection = r.get("real_depth_projection")
        real_share = None if not projection else 100 * projection["fixed_gap_over_bound_b"]
        lines.append(f"| {r['budget']} | {_ms(r['gap_b_s'])} | {_x(share, 1)}% | {_ms(g['request_overhead'])} "
                     f"| {_ms(g['vision_encoder'])} | {_x(1000 * g['attention_extraction'], 1)} "
                     f"| {_x(1000 * g['selector'], 1)} | {_ms(g['llm_prefill_residual'])} | {_x(real_share, 1)}% |")
    lines += [
        "",
        "Text-only prefills (the LLM alone; GFLOP/s falls with the token count: smaller GEMMs run less efficiently)",
        "",
        "| tokens | TTFT (ms) | prefill (ms) | tokens/s | GFLOP/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tx = r["text_only"]
        gflops = None if not tx["prefill_s"] else tx["flops"] / tx["prefill_s"] / 1e9
        lines.append(f"| {tx['tokens']} | {_ms(tx['ttft_s'])} | {_ms(tx['prefill_s'])} "
                     f"| {_x(tx['prefill_tokens_per_s'], 0)} | {_x(gflops, 1)} |")
    if report["concurrency"]:
        lines += [
            "",
            "Concurrency: the same number of requests, each with its own image, with mixed budgets "
            f"({', '.join(str(b) for b in config['budgets'])}, cycling) vs without budgets; {config['max_tokens']} "
            "output tokens each (latencies in ms)",
            "",
            "| concurrency | mode | requests | errors | req/s | output tok/s | TTFT p50 | TTFT p95 | e2e p50 | e2e p95 "
            "| speed-up | never slower |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        verdicts = {v["concurrency"]: v for v in report["verdicts"]["per_concurrency"]}
        for level in report["concurrency"]:
            verdict = verdicts[level["concurrency"]]
            for mode in ("unpruned", "pruned"):
                m = level[mode]
                extra = (f"{verdict['speedup_throughput']:.2f}x | {'yes' if verdict['never_slower'] else '**no**'}"
                         if mode == "pruned" else "| ")
                lines.append(f"| {level['concurrency']} | {mode} | {m['requests']} | {m['errors']} "
                             f"| {m['requests_per_s']:.3f} | {m['output_tokens_per_s']:.2f} | {_ms(m['ttft_p50_s'])} "
                             f"| {_ms(m['ttft_p95_s'])} | {_ms(m['e2e_p50_s'])} | {_ms(m['e2e_p95_s'])} | {extra} |")
    scaling, inproc = config["scaling"], report["in_process"]
    vision_s = rows[0]["components_s"]["vision_encoder"]
    vision_gflops = sum(report["flop_model"]["full_served"][k] for k in ("vision_tower", "projector")) / 1e9
    by_threads = inproc.get("by_threads") or {str(inproc.get("threads", "?")): inproc}
    cross = "; ".join(f"{threads} thread(s): tower + projector {_ms(r.get('vision_tower_projector_s'))} ms, "
                      f"probe {_x(None if r.get('attention_probe_s') is None else 1000 * r['attention_probe_s'], 2)} ms"
                      for threads, r in by_threads.items())
    deepstack = ("" if "deepstack_visual_indexes" not in scaling else
                 f" (DeepStack taps {scaling['deepstack_visual_indexes']}, real {scaling['deepstack_visual_indexes_real']})")
    lines += [
        "",
        f"Scaling: LLM {scaling['llm_layers']} of {scaling['llm_layers_real']} layers, {fam.tower} "
        f"{scaling['vision_layers_run']} of {scaling['vision_layers_run_real']}{deepstack}; vision/LLM FLOPs {scaling['vision_to_llm_flops_served']:.4f} served vs "
        f"{scaling['vision_to_llm_flops_real']:.4f} real ({scaling['ratio_mismatch']:.2f} x). Vision encoder on the "
        f"server: {_ms(vision_s)} ms for {vision_gflops:.1f} GFLOP "
        f"({_x(None if not vision_s else vision_gflops / vision_s, 0)} GFLOP/s). In process (server stopped): {cross}.",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["single_stream"]
    panels = 2 if report["concurrency"] else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    axis = axes[0][0]
    labels = [r["budget"] for r in rows]
    xs = list(range(len(rows)))
    bottoms = [0.0] * len(rows)
    parts = [("request_overhead", "request overhead"), ("vision_encoder", "vision encoder"),
             ("attention_extraction", "attention + selector"), ("llm_prefill", "LLM prefill"), ("residual", "residual")]
    for key, label in parts:
        heights = []
        for r in rows:
            c = r["components_s"]
            value = c[key] or 0.0
            if key == "attention_extraction":
                value += c["selector"] or 0.0
            heights.append(max(value, 0.0))
        axis.bar(xs, heights, 0.55, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axis.plot(xs, [r["ttft_s"] for r in rows], "ko", label="TTFT (measured)", zorder=4)
    axis.plot(xs, [r["bound_b_s"] for r in rows], "r_", markersize=26, markeredgewidth=2.5, label="bound (b)", zorder=3)
    axis.plot(xs, [r["ideal_a_s"] for r in rows], "b_", markersize=26, markeredgewidth=2.5, label="FLOP ideal (a)", zorder=3)
    if any(r.get("control") for r in rows):
        axis.plot(xs, [r["control"]["bound_c_s"] if r.get("control") else None for r in rows], "g_", markersize=26,
                  markeredgewidth=2.5, label="bound (c): near-free selector", zorder=3)
    axis.set_xticks(xs, labels)
    axis.set_xlabel("visual token budget")
    axis.set_ylabel("seconds")
    config = report["config"]
    axis.set_title(f"{config['shape']}-shaped, N={config['visual_tokens_N']}, T={config['text_tokens_T']}: TTFT",
                   fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
    if report["concurrency"]:
        axis = axes[0][1]
        levels = report["concurrency"]
        cx = list(range(len(levels)))
        width = 0.38
        for offset, mode in ((-width / 2, "unpruned"), (width / 2, "pruned")):
            axis.bar([x + offset for x in cx], [lv[mode]["requests_per_s"] for lv in levels], width, label=f"{mode}: req/s")
        axis.set_xticks(cx, [f"c={lv['concurrency']}" for lv in levels])
        axis.set_ylabel("requests / s")
        twin = axis.twinx()
        for mode, style in (("unpruned", "s--"), ("pruned", "o-")):
            twin.plot(cx, [lv[mode]["ttft_p50_s"] for lv in levels], style, color="black", label=f"{mode}: TTFT p50")
            twin.plot(cx, [lv[mode]["ttft_p95_s"] for lv in levels], style, color="grey", label=f"{mode}: TTFT p95")
        twin.set_ylabel("TTFT (s)")
        twin.set_yscale("log")
        handles = axis.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        axis.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=7, loc="upper left")
        axis.set_title(f"mixed budgets {config['budgets']} vs none", fontsize=9)
    env = report["environment"]
    figure.suptitle(f"vLLM {env['vllm']} CPU float32, {env['cpu_count']} cores; random weights; "
                    f"LLM {config['scaling']['llm_layers']} layers, {family(config['shape']).tower} "
                    f"{config['scaling']['vision_layers_run']}",
                    fontsize=9)
    save_figure(figure, path)


def header_of(report: dict[str, Any]) -> str:
    config, env = report["config"], report["environment"]
    text, vision = config["served_text_config"], config["served_vision_config"]
    return (f"Serving benchmark, {config['shape']}-shaped ({config['real_model']} widths"
            f"{', quick: tiny widths' if config['quick'] else ''}): LLM {text['num_hidden_layers']} x "
            f"{text['hidden_size']} (MLP {text['intermediate_size']}), {family(config['shape']).tower} "
            f"{vision['layers_run']} x {vision['hidden_size']}, random weights, float32; vLLM {env['vllm']} CPU ({env['cpu_count']} cores, "
            f"load {env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}), selector {config['selector']}, "
            f"{config['max_tokens']} output tokens, prefix and multimodal caches off; {env['total_seconds']:.0f} s")


def write(report: dict[str, Any], out: Path, *, with_plot: bool = True) -> None:
    """Print the header and the tables, and write ``out`` (JSON), ``out.md`` and (``with_plot``) ``out.png``."""
    header, table = header_of(report), markdown_table(report)
    show(header, table)
    write_report(out, report, header, table, plot if with_plot else None)
