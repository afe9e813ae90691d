"""``vllm.stat_logger_plugins`` entry point: request latency by visual-token budget bucket.

vLLM hands every stat logger the stats of each finished request (id, end-to-end latency, decode time, ...) in
the API server process. The request's budget bucket was filed under the same id by the processor (see
:class:`textscythe_vllm.metrics._RequestBuckets`); text-only requests and requests that did not pass the
middleware have none and are not observed.
"""

from __future__ import annotations

from typing import Any

from textscythe_vllm import metrics
from textscythe_vllm._vllm import StatLoggerBase


class TextScytheStatLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.model_name = vllm_config.model_config.served_model_name

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if iteration_stats is None:
            return
        for finished in iteration_stats.finished_requests:
            if finished.request_id is None:
                continue
            bucket = metrics.REQUEST_BUCKETS.pop(finished.request_id)
            if bucket is None:
                continue
            metrics.REQUEST_E2E.labels(self.model_name, bucket).observe(finished.e2e_latency)
            # vLLM's finished-request stats carry no TTFT; e2e minus the decode interval is arrival -> first
            # token (the decode interval runs from the first to the last token).
            ttft = max(0.0, finished.e2e_latency - finished.decode_time)
            metrics.REQUEST_TTFT.labels(self.model_name, bucket).observe(ttft)

    def log_engine_initialized(self) -> None:
        pass
