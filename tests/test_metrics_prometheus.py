"""A real Prometheus scraping a real ``vllm serve`` with the plugin: the metrics agree with what the requests
did, and every PromQL expression of the Grafana dashboard returns data."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import openai
import pytest

from textscythe_dev.images import scene, user_message
from textscythe_dev.prometheus import PrometheusServer
from textscythe_dev.server import VLLMServer, wait_until

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary (setup_env.sh)"),
]
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "textscythe.json"
IMAGE_TOKENS = 576
# (budget, selector) of each request; every request uses its own image, so every budget means one selection.
REQUESTS = [(None, None), (None, None), (64, None), (64, "divprune"), (100, None), (1000, None), (200, "visionzip")]


@pytest.fixture(scope="module")
def stack(tiny_llava_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vllm-metrics.log"
    with VLLMServer(tiny_llava_dir, ["--load-format", "dummy"], log_path=log, served_model_name="tiny-llava") as server, \
            PrometheusServer(server.base_url.removeprefix("http://")) as prometheus:
        started = time.monotonic()
        # Prometheus scrapes while the traffic runs, so rates over the traffic's window have data.
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        for index, (budget, selector) in enumerate(REQUESTS):
            extra = {}
            if budget is not None:
                extra["visual_token_budget"] = budget
            if selector is not None:
                extra["visual_token_selector"] = selector
            client.chat.completions.create(
                model=server.model_name, messages=[user_message("what colour is the car ?", scene(100 + index))],
                max_tokens=3, extra_body=extra or None,
            )
            # at least one scrape between requests, so rate() sees each step
            scrapes = prometheus.value("count_over_time(up[10m])") or 0
            assert wait_until(lambda seen=scrapes: (prometheus.value("count_over_time(up[10m])") or 0) > seen, 30)
        # A text-only request: counted by vLLM, not by the plugin's per-budget metrics.
        client.chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=2
        )
        assert prometheus.wait_for("sum(textscythe_requests_total)", len(REQUESTS)) == len(REQUESTS)
        scrapes = prometheus.value("count_over_time(up[10m])") or 0  # two more scrapes after the last request
        assert wait_until(lambda: (prometheus.value("count_over_time(up[10m])") or 0) >= scrapes + 2, 30)
        server.traffic_started = started
        yield server, prometheus


def test_token_counters_match_the_requests(stack):
    _, prometheus = stack
    kept = sum(IMAGE_TOKENS if budget is None else min(budget, IMAGE_TOKENS) for budget, _ in REQUESTS)
    assert prometheus.wait_for("sum(textscythe_visual_tokens_after_total)", kept) == kept
    assert prometheus.value("sum(textscythe_visual_tokens_before_total)") == IMAGE_TOKENS * len(REQUESTS)
    budgets_sent = sum(budget for budget, _ in REQUESTS if budget is not None and budget < IMAGE_TOKENS)
    pruned_kept = prometheus.value('sum(textscythe_visual_tokens_after_total{selector!="none"})')
    assert pruned_kept == budgets_sent + IMAGE_TOKENS  # the 1000-budget image keeps all 576


def test_pruning_ratio_histogram(stack):
    _, prometheus = stack
    with_budget = [budget for budget, _ in REQUESTS if budget is not None]
    assert prometheus.value("sum(textscythe_pruning_ratio_count)") == len(with_budget)
    expected = sum(1 - min(budget, IMAGE_TOKENS) / IMAGE_TOKENS for budget in with_budget)
    assert prometheus.value("sum(textscythe_pruning_ratio_sum)") == pytest.approx(expected)


def test_requests_by_budget_bucket_and_selector(stack):
    _, prometheus = stack
    by_bucket = {r["metric"]["budget_bucket"]: float(r["value"][1])
                 for r in prometheus.query("sum by (budget_bucket) (textscythe_requests_total) > 0")}
    assert by_bucket == {"none": 2, "<=64": 2, "<=128": 1, "<=256": 1, ">576": 1}
    by_selector = {r["metric"]["selector"]: float(r["value"][1])
                   for r in prometheus.query("sum by (selector) (textscythe_requests_total) > 0")}
    assert by_selector == {"none": 2, "textscythe": 3, "divprune": 1, "visionzip": 1}


def test_worker_side_selector_metrics_arrive(stack):
    _, prometheus = stack
    # Selection runs in the worker process for the budgets below 576: 64, 64 (divprune), 100, 200 (visionzip).
    by_selector = {r["metric"]["selector"]: float(r["value"][1])
                   for r in prometheus.query("sum by (selector) (textscythe_selector_latency_seconds_count) > 0")}
    assert by_selector == {"textscythe": 2, "divprune": 1, "visionzip": 1}
    assert prometheus.value("sum(textscythe_selector_latency_seconds_sum)") > 0
    assert prometheus.value("sum(textscythe_selector_fallbacks_total)") == 0


def test_latency_by_budget_bucket(stack):
    _, prometheus = stack
    for metric in ("textscythe_request_ttft_seconds", "textscythe_request_e2e_latency_seconds"):
        counts = {r["metric"]["budget_bucket"]: float(r["value"][1])
                  for r in prometheus.query(f"sum by (budget_bucket) ({metric}_count) > 0")}
        assert counts == {"none": 2, "<=64": 2, "<=128": 1, "<=256": 1, ">576": 1}, metric
    ttft = prometheus.value("sum(textscythe_request_ttft_seconds_sum)")
    e2e = prometheus.value("sum(textscythe_request_e2e_latency_seconds_sum)")
    assert 0 < ttft <= e2e


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    return [target["expr"] for panel in panels for target in panel.get("targets", []) if target.get("expr")]


def test_every_dashboard_expression_returns_data(stack):
    server, prometheus = stack
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    # Grafana's range variables become a window reaching back to before the traffic, however slow the machine
    # was, so every event stays in range; each expression gets until the deadline to return data.
    window = f"{int(time.monotonic() - server.traffic_started) + 60}s"
    concrete = {expression: re.sub(r"\$__rate_interval|\$__interval|\$__range", window,
                                   expression.replace("$model_name", ".*")) for expression in expressions}
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [expression for expression, query in concrete.items() if not prometheus.query(query)]
        return not empty

    assert wait_until(all_have_data, 30), f"no data for: {empty}"
