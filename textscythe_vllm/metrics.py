"""Prometheus metrics of the plugin (prefix ``textscythe_``); see docs/metrics.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from textscythe_vllm.processing import ImagePlan

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_RATIO_BUCKETS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)

VISUAL_TOKENS_BEFORE = Counter(
    "textscythe_visual_tokens_before", "Visual tokens of pruned items before pruning", ["selector"]
)
VISUAL_TOKENS_AFTER = Counter(
    "textscythe_visual_tokens_after", "Visual tokens of pruned items kept after pruning", ["selector"]
)
PRUNING_RATIO = Histogram(
    "textscythe_pruning_ratio", "Fraction of an item's visual tokens removed", ["selector"], buckets=_RATIO_BUCKETS
)
SELECTOR_LATENCY = Histogram(
    "textscythe_selector_latency_seconds",
    "Time spent choosing one item's tokens (selection and its inputs)",
    ["selector"],
    buckets=_LATENCY_BUCKETS,
)
FALLBACKS = Counter(
    "textscythe_selector_fallbacks", "Selections that failed and used the deterministic fallback", ["selector"]
)


def record_selection(plan: ImagePlan, before: int, after: int, seconds: float) -> None:
    VISUAL_TOKENS_BEFORE.labels(plan.selector).inc(before)
    VISUAL_TOKENS_AFTER.labels(plan.selector).inc(after)
    PRUNING_RATIO.labels(plan.selector).observe(1.0 - after / before if before else 0.0)
    SELECTOR_LATENCY.labels(plan.selector).observe(seconds)


def record_fallback(selector: str) -> None:
    FALLBACKS.labels(selector).inc()
