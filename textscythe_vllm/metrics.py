"""Prometheus metrics of the plugin (prefix ``textscythe_``, label ``model_name``); docs/metrics.md lists them.

Where each metric is recorded:

* **API server** (where vLLM runs the multimodal processor and the stat loggers, and serves ``/metrics``):
  requests by budget bucket, visual tokens before/after, pruning ratio, and TTFT / end-to-end latency by
  budget bucket. These live in prometheus-client's default registry, which ``/metrics`` serves.
* **Worker** (where ``embed_multimodal`` runs): selector latency and fallbacks. vLLM spawns the worker in
  another process, so these are written with prometheus-client's multiprocess value files into a directory
  that the root process creates in ``register()`` (inherited by every process vLLM spawns through
  ``TEXTSCYTHE_METRICS_DIR``), and the root process adds a ``MultiProcessCollector`` over that directory to
  its default registry, so they appear on the same ``/metrics`` with no manual step. If vLLM itself runs in
  multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, e.g. ``--api-server-count > 1``), the worker files go
  into vLLM's directory instead and vLLM's collector picks them up.

Profiling (dummy) inputs are never counted: the processor skips them and they carry no pruning plan.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

from textscythe_vllm import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

METRICS_DIR_ENV = "TEXTSCYTHE_METRICS_DIR"
NO_SELECTOR = "none"
#: (upper bound, label) of the budget buckets; budgets above the last bound are ">576".
BUDGET_BUCKETS = ((64, "<=64"), (128, "<=128"), (256, "<=256"), (576, "<=576"))
NO_BUDGET = "none"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RATIO_BUCKETS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


def budget_bucket(budget: int | None) -> str:
    if budget is None:
        return NO_BUDGET
    for bound, label in BUDGET_BUCKETS:
        if budget <= bound:
            return label
    return f">{BUDGET_BUCKETS[-1][0]}"


# --- API-server metrics ---------------------------------------------------------------------------------
REQUESTS = Counter(
    "textscythe_requests", "Multimodal requests by visual-token budget bucket and selector",
    ["model_name", "budget_bucket", "selector"],
)
VISUAL_TOKENS_BEFORE = Counter(
    "textscythe_visual_tokens_before", "Visual tokens of all images before pruning", ["model_name", "selector"]
)
VISUAL_TOKENS_AFTER = Counter(
    "textscythe_visual_tokens_after", "Visual tokens of all images after pruning (what the LLM prefills)",
    ["model_name", "selector"],
)
PRUNING_RATIO = Histogram(
    "textscythe_pruning_ratio", "Fraction of an image's visual tokens removed (images with a budget)",
    ["model_name", "selector"], buckets=_RATIO_BUCKETS,
)
REQUEST_TTFT = Histogram(
    "textscythe_request_ttft_seconds", "Time to first token of multimodal requests, by budget bucket",
    ["model_name", "budget_bucket"], buckets=_REQUEST_BUCKETS,
)
REQUEST_E2E = Histogram(
    "textscythe_request_e2e_latency_seconds", "End-to-end latency of multimodal requests, by budget bucket",
    ["model_name", "budget_bucket"], buckets=_REQUEST_BUCKETS,
)


_initialized_models: set[str] = set()


def budget_bucket_labels() -> list[str]:
    return [NO_BUDGET, *(label for _, label in BUDGET_BUCKETS), budget_bucket(BUDGET_BUCKETS[-1][0] + 1)]


def initialize_api_server_metrics(model_name: str) -> None:
    """Create every label combination at 0, so ``rate()``/``increase()`` see the first event of each series
    (a series that first appears at 1 counts as no increase)."""
    if model_name in _initialized_models:
        return
    from textscythe_vllm.selectors import available_selectors

    selectors = [NO_SELECTOR, *available_selectors()]
    for bucket in budget_bucket_labels():
        REQUEST_TTFT.labels(model_name, bucket)
        REQUEST_E2E.labels(model_name, bucket)
        for selector in selectors:
            if (bucket == NO_BUDGET) == (selector == NO_SELECTOR):
                REQUESTS.labels(model_name, bucket, selector)
    for selector in selectors:
        VISUAL_TOKENS_BEFORE.labels(model_name, selector)
        VISUAL_TOKENS_AFTER.labels(model_name, selector)
        if selector != NO_SELECTOR:
            PRUNING_RATIO.labels(model_name, selector)
    _initialized_models.add(model_name)


def record_request(model_name: str, budget: int | None, selector: str | None,
                   tokens_before: Sequence[int], tokens_after: Sequence[int]) -> None:
    """One processed multimodal request: its images' visual-token counts before and after pruning."""
    label = selector if budget is not None and selector else NO_SELECTOR
    REQUESTS.labels(model_name, budget_bucket(budget), label).inc()
    VISUAL_TOKENS_BEFORE.labels(model_name, label).inc(sum(tokens_before))
    VISUAL_TOKENS_AFTER.labels(model_name, label).inc(sum(tokens_after))
    if budget is not None:
        for before, after in zip(tokens_before, tokens_after, strict=True):
            PRUNING_RATIO.labels(model_name, label).observe(1.0 - after / before if before else 0.0)


class _RequestBuckets:
    """Budget bucket of in-flight requests, keyed by the id vLLM reports for them when they finish.

    The middleware announces each request's possible ids and gets an unguessable *ticket*, which travels to the
    processor inside ``mm_processor_kwargs``; the processor (which knows the effective budget, server default
    included, and whether the request has media) claims the ticket's ids and files the bucket under them; the
    stat logger takes it out when the request finishes. A ticket the middleware did not issue (a client
    forging the private key on any route or frontend) files nothing. Both maps are bounded, so requests that
    never reach the processor or never finish cannot grow them.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self._guard = threading.Lock()
        self._tickets: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._buckets: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity

    def announce(self, request_ids: Sequence[str]) -> str:
        """Middleware: remember the ids vLLM may report this request under; returns the ticket."""
        ticket = secrets.token_hex(16)
        with self._guard:
            self._tickets[ticket] = tuple(request_ids)
            _trim(self._tickets, self._capacity)
        return ticket

    def claim(self, ticket: object) -> tuple[str, ...]:
        """Processor: the ids announced with ``ticket`` (a ticket works once); ``()`` for a ticket the middleware
        did not issue."""
        if not isinstance(ticket, str):
            return ()
        with self._guard:
            return self._tickets.pop(ticket, ())

    def file(self, request_ids: tuple[str, ...], bucket: str) -> None:
        """Processor: file ``bucket`` under the request's ids."""
        with self._guard:
            for request_id in request_ids:
                self._buckets[request_id] = bucket
            _trim(self._buckets, self._capacity)

    def pop(self, request_id: str) -> str | None:
        """Bucket of a finished request, given vLLM's external id: ``chatcmpl-<id>``, ``cmpl-<id>``, and a
        ``_<n>`` suffix for the sub-requests of ``/v1/responses`` and ``/v1/chat/completions/batch``."""
        base = _SUB_REQUEST.sub("", request_id)
        with self._guard:
            for candidate in dict.fromkeys((request_id, base)):
                for prefix in ("", "chatcmpl-", "cmpl-"):
                    if candidate.startswith(prefix):
                        bucket = self._buckets.pop(candidate[len(prefix):], None)
                        if bucket is not None:
                            return bucket
        return None


_SUB_REQUEST = re.compile(r"_\d+$")


def _trim(entries: OrderedDict, capacity: int) -> None:
    while len(entries) > capacity:
        entries.popitem(last=False)


REQUEST_BUCKETS = _RequestBuckets()


# --- worker metrics -----------------------------------------------------------------------------------
class WorkerMetrics:
    """Selector latency and fallbacks, recorded in the worker process (multiprocess files, see module doc)."""

    def __init__(self, model_name: str, selectors: Sequence[str]) -> None:
        self.model_name = model_name
        with _multiprocess_values():
            self.latency = Histogram(
                "textscythe_selector_latency_seconds",
                "Time to choose one image's visual tokens in the worker, [CLS]-attention work included",
                ["model_name", "selector"], buckets=_LATENCY_BUCKETS, registry=None,
            )
            self.fallbacks = Counter(
                "textscythe_selector_fallbacks", "Selections that failed and used the deterministic fallback",
                ["model_name", "selector"], registry=None,
            )
            # Children are created now, inside the multiprocess context: later .labels() calls reuse them.
            for selector in selectors:
                self.latency.labels(model_name, selector)
                self.fallbacks.labels(model_name, selector)

    def record_selection(self, selector: str, seconds: float) -> None:
        self.latency.labels(self.model_name, selector).observe(seconds)

    def record_fallback(self, selector: str) -> None:
        self.fallbacks.labels(self.model_name, selector).inc()


_worker_metrics: WorkerMetrics | None = None


def setup_worker_metrics(model_name: str) -> WorkerMetrics:
    """Create (once per process) the worker metrics; called from the model's constructor."""
    global _worker_metrics
    if _worker_metrics is None:
        from textscythe_vllm.selectors import available_selectors

        _worker_metrics = WorkerMetrics(model_name, available_selectors())
    return _worker_metrics


def record_selection(selector: str, seconds: float) -> None:
    if _worker_metrics is not None:
        _worker_metrics.record_selection(selector, seconds)


def record_fallback(selector: str) -> None:
    if _worker_metrics is not None:
        _worker_metrics.record_fallback(selector)


def worker_metrics_directory() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(METRICS_DIR_ENV)


@contextlib.contextmanager
def _multiprocess_values() -> Iterator[None]:
    """Create metric values backed by multiprocess files in :func:`worker_metrics_directory`."""
    directory = worker_metrics_directory()
    if directory is None or not os.path.isdir(directory):
        yield  # no collecting process: plain in-process values (visible only to this process)
        return
    saved_class, saved_env = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # read by MmapedValue when it opens its file
    values.ValueClass = values.MultiProcessValue()
    try:
        yield
    finally:
        values.ValueClass = saved_class
        if saved_env is None:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


_collector_registered = False


def setup_process() -> None:
    """Called by ``register()`` in every vLLM process.

    The root process (not started by ``multiprocessing``: the ``vllm serve`` API server, or a script using
    ``vllm.LLM``) creates the worker-metrics directory, exports it to the processes vLLM spawns, and collects
    it into its default registry. Spawned processes (engine core, workers) inherit the directory.
    """
    global _collector_registered
    if multiprocessing.parent_process() is not None or _collector_registered:
        return
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # vLLM's own multiprocess mode collects every file in that directory already
    directory = tempfile.mkdtemp(prefix="textscythe-metrics-")
    os.environ[METRICS_DIR_ENV] = directory
    atexit.register(shutil.rmtree, directory, True)
    MultiProcessCollector(REGISTRY, path=directory)
    _collector_registered = True
