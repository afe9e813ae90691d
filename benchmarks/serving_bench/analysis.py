"""The analysis: from raw measurements (one :class:`Outcome` per request, the concurrency levels, the in-process
timings) to the report's ``flop_model``, ``single_stream`` and ``verdicts``.

Per budget: the FLOP ideal (a) TTFT(none) x FLOPs(K) / FLOPs(none), the measured bound (b) TTFT(none) -
(TTFT_text(T + N) - TTFT_text(T + K)), the control's bound (c), the components of TTFT and of the gap TTFT(K) -
(b), and a projection of the fixed costs to the real depth; per concurrency level, whether pruning was never
slower. :func:`summarise` is what both a run and ``--reanalyse`` go through.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from .flops import Served, served_from_config

NO_BUDGET = "none"
GOAL_FRACTION = 0.10  # TTFT(K) within 10% of bound (b)


@dataclass
class Outcome:
    """One request's measurements (the report's ``requests`` entries)."""

    label: str
    budget: int | None
    kind: str
    expected_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    # single-stream only: per-request deltas of the server's metrics
    prefill_s: float | None = None
    queue_s: float | None = None
    decode_s: float | None = None
    selector_s: float | None = None
    round: int | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_of(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def analyse(outcomes: list[Outcome], served: Served, budgets: list[int], probe_s: float | None,
            rounds: int) -> dict[str, Any]:
    """Per budget: levels (TTFT, prefill, e2e, text-only prefill, ...) are medians over rounds; differences
    between request types (bound (b), the gap TTFT(K) - (b) and its components, the vision encoder) are taken
    within each round -- between requests sent next to each other -- and then the median over rounds, which
    is robust to a load change on a shared machine. Medians of per-round terms need not add up exactly."""
    good = [o for o in outcomes if o.error is None]

    def med(label: str, name: str) -> float | None:
        return median_of([getattr(o, name) for o in good if o.label == label])

    rounds_of = {label: {o.round: o for o in good if o.label == label}
                 for label in {o.label for o in good}}
    n, t, fam = served.num_visual, served.text_tokens, served.family
    request_flops = fam.request_flops
    full = request_flops(t, n, served.views, served.text, served.vision, served.vision_layers)
    real_full = request_flops(t, n, served.views, fam.real_text, fam.real_vision, fam.real_vision_layers)
    llm_scale = fam.real_text["num_hidden_layers"] / served.text["num_hidden_layers"]
    served_vision = full["vision_tower"] + full["projector"]
    vision_scale = (real_full["vision_tower"] + real_full["projector"]) / served_vision if served_vision else 1.0
    base_ttft = med(f"image@{NO_BUDGET}", "ttft_s")
    rows = []
    for budget in [None, *budgets]:
        key = NO_BUDGET if budget is None else str(budget)
        visual = n if budget is None else min(budget, n)
        image, text = f"image@{key}", f"text@{key}"
        per_round: dict[str, list[float]] = {}
        for r in range(rounds):
            group = [rounds_of.get(label, {}).get(r) for label in
                     (image, text, f"image@{NO_BUDGET}", f"text@{NO_BUDGET}")]
            if None in group:
                continue
            img, txt, img_full, txt_full = group
            sel = (img.selector_s or 0.0) if budget is not None else 0.0
            bound = img_full.ttft_s - (txt_full.ttft_s - txt.ttft_s)
            values = {
                "bound_b": bound, "gap_b": img.ttft_s - bound, "ttft_over_bound_b": img.ttft_s / bound,
                "vision": img_full.prefill_s - txt_full.prefill_s,
                "residual": (img.prefill_s - sel - txt.prefill_s) - (img_full.prefill_s - txt_full.prefill_s),
                "delta_overhead": ((img.ttft_s - img.prefill_s) - (img_full.ttft_s - img_full.prefill_s)
                                   - (txt.ttft_s - txt.prefill_s) + (txt_full.ttft_s - txt_full.prefill_s)),
                "full_overhead": img_full.ttft_s - img_full.prefill_s,
            }
            control = rounds_of.get(f"control@{key}", {}).get(r)
            if control is not None:
                control_bound = control.ttft_s - (control.selector_s or 0.0)
                values.update(bound_c=control_bound, gap_c=img.ttft_s - control_bound,
                              ttft_over_bound_c=img.ttft_s / control_bound, over_control=img.ttft_s - control.ttft_s)
            for name, value in values.items():
                per_round.setdefault(name, []).append(value)
        paired = {name: statistics.median(values) for name, values in per_round.items()}
        ttft, prefill, e2e = med(image, "ttft_s"), med(image, "prefill_s"), med(image, "e2e_s")
        text_ttft, text_prefill = med(text, "ttft_s"), med(text, "prefill_s")
        overheads = [o.ttft_s - o.prefill_s for o in good if o.label == image]
        selector_metric = (med(image, "selector_s") or 0.0) if budget is not None else 0.0
        attention = min(probe_s or 0.0, selector_metric) if budget is not None else 0.0  # the probe is in the metric
        flops = request_flops(t, visual, served.views, served.text, served.vision, served.vision_layers)
        real = request_flops(t, visual, served.views, fam.real_text, fam.real_vision, fam.real_vision_layers)
        bound_b, gap = paired.get("bound_b"), paired.get("gap_b")
        row: dict[str, Any] = {
            "budget": key, "visual_tokens": visual, "prompt_tokens": t + visual,
            "rounds": len(per_round.get("bound_b", [])),
            "ttft_s": ttft, "prefill_s": prefill, "e2e_s": e2e,
            "ttft_times_s": [o.ttft_s for o in good if o.label == image],
            "ratio_measured": ttft / base_ttft if ttft and base_ttft else None,
            "prefill_ratio_measured": (prefill / med(f"image@{NO_BUDGET}", "prefill_s")
                                       if prefill and med(f"image@{NO_BUDGET}", "prefill_s") else None),
            "flops": flops["total"], "ratio_a": flops["total"] / full["total"],
            "ratio_a_real_model": real["total"] / real_full["total"],
            "ideal_a_s": base_ttft * flops["total"] / full["total"] if base_ttft else None,
            "bound_b_s": bound_b, "ratio_b": bound_b / base_ttft if bound_b and base_ttft else None,
            "gap_b_s": gap,
            "ttft_over_bound_b": 1 + gap / bound_b if gap is not None and bound_b else None,
            "ttft_over_bound_b_per_round": per_round.get("ttft_over_bound_b", []),
            "components_s": {
                "request_overhead": median_of(overheads),
                "vision_encoder": paired.get("vision"),
                "attention_extraction": attention,
                "selector": None if budget is None else selector_metric - attention,
                "llm_prefill": text_prefill,
                "residual": paired.get("residual"),
            },
            "selector_metric_s": selector_metric if budget is not None else None,
            "gap_components_s": None if budget is None else {
                "request_overhead": paired.get("delta_overhead"),
                "vision_encoder": 0.0,  # the same tower runs for every budget; its probe is attention extraction
                "attention_extraction": attention,
                "selector": selector_metric - attention,
                "llm_prefill_residual": paired.get("residual"),
            },
            "text_only": {"tokens": t + visual, "ttft_s": text_ttft, "prefill_s": text_prefill,
                          "prefill_tokens_per_s": (t + visual) / text_prefill if text_prefill else None,
                          "flops": flops["total"] - flops["vision_tower"] - flops["projector"]},
        }
        row["within_10pct_of_b"] = (row["ttft_over_bound_b"] <= 1 + GOAL_FRACTION
                                    if budget is not None and row["ttft_over_bound_b"] is not None else None)
        bound_c, gap_c = paired.get("bound_c"), paired.get("gap_c")
        row["control"] = None if bound_c is None else {
            "ttft_s": med(f"control@{key}", "ttft_s"), "selector_metric_s": med(f"control@{key}", "selector_s"),
            "bound_c_s": bound_c, "gap_c_s": gap_c, "ttft_over_bound_c": 1 + gap_c / bound_c,
            "ttft_over_bound_c_per_round": per_round["ttft_over_bound_c"],
            "ttft_minus_control_s": paired["over_control"],
            "bound_b_per_round_s": per_round.get("bound_b", []), "bound_c_per_round_s": per_round["bound_c"],
        }
        # What the depth cut exaggerates: the costs that do not grow with depth (selector, probe, request
        # overhead), set against bound (b) with the LLM prefill and the vision encoder scaled to the real depth.
        if budget is not None and None not in (text_prefill, paired.get("vision"), paired.get("full_overhead")):
            fixed = attention + (selector_metric - attention) + (paired.get("delta_overhead") or 0.0)
            bound_real = llm_scale * text_prefill + vision_scale * paired["vision"] + paired["full_overhead"]
            row["real_depth_projection"] = {
                "llm_scale": llm_scale, "vision_scale": vision_scale, "bound_b_s": bound_real,
                "fixed_gap_s": fixed, "fixed_gap_over_bound_b": fixed / bound_real,
            }
        else:
            row["real_depth_projection"] = None
        rows.append(row)
    return {"rows": rows, "flops_full": full, "flops_full_real_model": real_full}


def concurrency_verdicts(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    verdicts = []
    for level in levels:
        pruned, unpruned = level["pruned"], level["unpruned"]
        checks = {
            "throughput": pruned["requests_per_s"] >= unpruned["requests_per_s"],
            "ttft_p50": (pruned["ttft_p50_s"] or math.inf) <= (unpruned["ttft_p50_s"] or math.inf),
            "ttft_p95": (pruned["ttft_p95_s"] or math.inf) <= (unpruned["ttft_p95_s"] or math.inf),
            "e2e_p50": (pruned["e2e_p50_s"] or math.inf) <= (unpruned["e2e_p50_s"] or math.inf),
        }
        verdicts.append({"concurrency": level["concurrency"], **checks, "never_slower": all(checks.values()),
                         "speedup_throughput": pruned["requests_per_s"] / unpruned["requests_per_s"]})
    return verdicts


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Add the analysis (``flop_model``, ``single_stream``, ``verdicts``) to a report of raw measurements."""
    config = report["config"]
    served = served_from_config(config)
    outcomes = [Outcome(**o) for o in report["requests"]]
    analysis = analyse(outcomes, served, config["budgets"], report["in_process"].get("attention_probe_s"),
                       config["rounds"])
    verdicts = concurrency_verdicts(report["concurrency"])
    pruned_rows = [r for r in analysis["rows"] if r["budget"] != NO_BUDGET]
    report["flop_model"] = {"full_served": analysis["flops_full"], "full_real_model": analysis["flops_full_real_model"]}
    report["single_stream"] = analysis["rows"]
    report["verdicts"] = {
        "ttft_within_10pct_of_bound_b": (all(r["within_10pct_of_b"] for r in pruned_rows)
                                         if pruned_rows and all(r["within_10pct_of_b"] is not None
                                                                for r in pruned_rows) else None),
        "ttft_within_10pct_of_bound_c": (all(r["control"]["ttft_over_bound_c"] <= 1 + GOAL_FRACTION
                                             for r in pruned_rows)
                                         if pruned_rows and all(r.get("control") for r in pruned_rows) else None),
        "per_concurrency": verdicts,
        "never_slower": all(v["never_slower"] for v in verdicts) if verdicts else None,
        "meaningful": not config["quick"],
    }
    return report

