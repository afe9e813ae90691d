"""Deployment files: Grafana dashboard and provisioning, Prometheus, docker compose, Kubernetes, Dockerfile and
its entrypoint, and scripts/render_dashboard.py. Fast and offline (no Docker, no cluster, no network)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD_PATH = DEPLOY / "grafana" / "dashboards" / "textscythe.json"
DATASOURCE_PATH = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_PATH = DEPLOY / "grafana" / "provisioning" / "dashboards" / "textscythe.yml"
PROMETHEUS_PATH = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE_PATH = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
RENDER_SCRIPT = ROOT / "scripts" / "render_dashboard.py"

MIDDLEWARE = "textscythe_vllm.middleware.VisualTokenBudgetMiddleware"

# The plugin's metrics (textscythe_vllm/metrics.py) and their labels, as documented.
_TS_COUNTERS = {
    "textscythe_requests": {"model_name", "budget_bucket", "selector"},
    "textscythe_visual_tokens_before": {"model_name", "selector"},
    "textscythe_visual_tokens_after": {"model_name", "selector"},
    "textscythe_selector_fallbacks": {"model_name", "selector"},
}
_TS_HISTOGRAMS = {
    "textscythe_pruning_ratio": {"model_name", "selector"},
    "textscythe_selector_latency_seconds": {"model_name", "selector"},
    "textscythe_request_ttft_seconds": {"model_name", "budget_bucket"},
    "textscythe_request_e2e_latency_seconds": {"model_name", "budget_bucket"},
}
# Labels Prometheus adds to every scraped series (static configs, kubernetes_sd relabelling, ServiceMonitor).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint"}


def _exposed(kind: str, name: str, labels: set[str] | None) -> dict[str, set[str] | None]:
    """Series names prometheus_client exposes for one metric (``_created`` series are not used)."""
    if kind == "counter":
        return {f"{name.removesuffix('_total')}_total": labels}
    if kind == "histogram":
        return {
            f"{name}_bucket": None if labels is None else labels | {"le"},
            f"{name}_sum": labels,
            f"{name}_count": labels,
        }
    return {name: labels}


TEXTSCYTHE_SERIES: dict[str, set[str] | None] = {}
for _name, _labels in _TS_COUNTERS.items():
    TEXTSCYTHE_SERIES.update(_exposed("counter", _name, _labels))
for _name, _labels in _TS_HISTOGRAMS.items():
    TEXTSCYTHE_SERIES.update(_exposed("histogram", _name, _labels))


def vllm_loggers_path() -> Path | None:
    """The installed vLLM's v1/metrics/loggers.py, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    return path if path.is_file() else None


def vllm_series(loggers_source: str) -> dict[str, set[str] | None]:
    """Exposed ``vllm:*`` series names -> label names (None: not statically known), from loggers.py."""
    series: dict[str, set[str] | None] = {}
    pattern = re.compile(r"self\._(gauge|counter|histogram)_cls\(\s*name=\"(vllm:[^\"]+)\"(.*?)\n\s*\)", re.S)
    for kind, name, body in pattern.findall(loggers_source):
        labels: set[str] | None = None
        match = re.search(r"labelnames\s*=\s*labelnames(?:\s*\+\s*\[([^\]]*)\])?\s*,", body)
        if match:
            labels = {"model_name", "engine"} | set(re.findall(r"\"([^\"]+)\"", match.group(1) or ""))
        series.update(_exposed(kind, name, labels))
    return series


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    config = yaml.safe_load(DATASOURCE_PATH.read_text())
    (datasource,) = config["datasources"]
    return datasource["uid"]


@pytest.fixture(scope="module")
def known_series() -> dict[str, set[str] | None]:
    path = vllm_loggers_path()
    if path is None:
        pytest.skip("vLLM is not installed: cannot check the vllm:* metric names")
    names = vllm_series(path.read_text())
    assert "vllm:kv_cache_usage_perc" in names and "vllm:prompt_tokens_total" in names, sorted(names)
    return {**TEXTSCYTHE_SERIES, **names}


def all_panels(dashboard: dict) -> list[dict]:
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            found.append(panel)
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def all_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in all_panels(dashboard) for target in panel.get("targets", [])]


# ---------------------------------------------------------------------------------------------------------
# A small PromQL parser (the subset dashboards use) with type and label checks.


class PromQLError(ValueError):
    pass


@dataclass
class Token:
    kind: str  # num, str, ident, op, range
    text: str
    pos: int


_OPS = ["==", "!=", "<=", ">=", "=~", "!~", "(", ")", "{", "}", ",", "+", "-", "*", "/", "%", "^", "<", ">", "="]
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_GRAFANA_INTERVALS = {"$__rate_interval", "$__interval", "$__range", "${__rate_interval}", "${__interval}",
                      "${__range}"}


def tokenize(expr: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "\"'`":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            if j >= len(expr):
                raise PromQLError(f"unterminated string at {i}")
            tokens.append(Token("str", expr[i + 1 : j], i))
            i = j + 1
        elif c == "[":
            j = expr.find("]", i)
            if j < 0:
                raise PromQLError(f"unbalanced '[' at {i}")
            tokens.append(Token("range", expr[i + 1 : j].strip(), i))
            i = j + 1
        elif c == "]":
            raise PromQLError(f"unbalanced ']' at {i}")
        elif c.isdigit() or (c == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            m = re.compile(r"\d*\.?\d+(?:[eE][+-]?\d+)?").match(expr, i)
            assert m is not None
            if m.end() < len(expr) and (expr[m.end()].isalpha() or expr[m.end()] == "_"):
                raise PromQLError(f"malformed number or stray duration at {i}: {expr[i:i + 10]!r}")
            tokens.append(Token("num", m.group(0), i))
            i = m.end()
        elif c.isalpha() or c in "_:":
            m = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*").match(expr, i)
            assert m is not None
            tokens.append(Token("ident", m.group(0), i))
            i = m.end()
        else:
            for op in _OPS:
                if expr.startswith(op, i):
                    tokens.append(Token("op", op, i))
                    i += len(op)
                    break
            else:
                raise PromQLError(f"unexpected character {c!r} at {i}")
    return tokens


_AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
                 "count_values", "limitk", "limit_ratio"}
_AGG_WITH_PARAM = {"topk": "scalar", "bottomk": "scalar", "quantile": "scalar", "count_values": "string",
                   "limitk": "scalar", "limit_ratio": "scalar"}
# name -> (argument types, number of required arguments, result type)
_FUNCTIONS: dict[str, tuple[tuple[str, ...], int, str]] = {
    **{f: (("matrix",), 1, "vector") for f in (
        "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "avg_over_time",
        "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
        "stddev_over_time", "stdvar_over_time", "present_over_time", "absent_over_time")},
    "quantile_over_time": (("scalar", "matrix"), 2, "vector"),
    "histogram_quantile": (("scalar", "vector"), 2, "vector"),
    "clamp": (("vector", "scalar", "scalar"), 3, "vector"),
    "clamp_min": (("vector", "scalar"), 2, "vector"),
    "clamp_max": (("vector", "scalar"), 2, "vector"),
    "round": (("vector", "scalar"), 1, "vector"),
    **{f: (("vector",), 1, "vector") for f in (
        "abs", "ceil", "floor", "exp", "ln", "log2", "log10", "sqrt", "sgn", "absent", "sort", "sort_desc",
        "timestamp")},
    "scalar": (("vector",), 1, "scalar"),
    "vector": (("scalar",), 1, "vector"),
    "time": ((), 0, "scalar"),
    "label_replace": (("vector", "string", "string", "string", "string"), 5, "vector"),
}
_BINARY_PRECEDENCE = {"or": 1, "and": 2, "unless": 2, "==": 3, "!=": 3, "<=": 3, ">=": 3, "<": 3, ">": 3,
                      "+": 4, "-": 4, "*": 5, "/": 5, "%": 5, "atan2": 5, "^": 6}
_COMPARISONS = {"==", "!=", "<=", ">=", "<", ">"}
_SET_OPS = {"and", "or", "unless"}


@dataclass
class Value:
    type: str  # scalar, vector, matrix, string
    labels: frozenset[str] = frozenset()  # the labels its series can carry
    exact: bool = False  # labels is exactly the label set (after an aggregation `by (...)`)
    open: bool = False  # labels are not statically known: anything goes


class PromQLChecker:
    """Recursive-descent parser for PromQL expressions that checks types, metric names and label names.

    ``series`` maps every metric name that may be used to its label names (None: unknown). Every vector
    selector must carry the dashboard's ``model_name=~"$model_name"`` matcher.
    """

    def __init__(self, expr: str, series: dict[str, set[str] | None]):
        self.expr = expr
        self.series = series
        self.tokens = tokenize(expr)
        self.i = 0
        self.metrics: set[str] = set()

    # -- token helpers
    def peek(self, offset: int = 0) -> Token | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def at(self, kind: str, text: str | None = None) -> bool:
        token = self.peek()
        return token is not None and token.kind == kind and (text is None or token.text == text)

    def take(self, kind: str, text: str | None = None) -> Token:
        token = self.peek()
        if token is None or token.kind != kind or (text is not None and token.text != text):
            found = "end of expression" if token is None else f"{token.text!r} at {token.pos}"
            raise PromQLError(f"expected {text or kind}, found {found}")
        self.i += 1
        return token

    def fail(self, message: str) -> PromQLError:
        return PromQLError(f"{message} in {self.expr!r}")

    def require_labels(self, labels: list[str], value: Value, where: str) -> None:
        missing = [label for label in labels if not value.open and label not in value.labels]
        if missing:
            raise self.fail(f"{where}: labels {missing} do not exist on {sorted(value.labels)}")

    # -- grammar
    def check(self) -> Value:
        value = self.expression(0)
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek().text!r}")  # type: ignore[union-attr]
        if value.type not in ("vector", "scalar"):
            raise self.fail(f"a panel query must be a vector or a scalar, not a {value.type}")
        return value

    def binary_operator(self) -> str | None:
        token = self.peek()
        if token is None:
            return None
        if token.kind == "op" and token.text in _BINARY_PRECEDENCE:
            return token.text
        if token.kind == "ident" and token.text in ("and", "or", "unless", "atan2"):
            return token.text
        return None

    def expression(self, min_precedence: int) -> Value:
        left = self.unary()
        while True:
            op = self.binary_operator()
            if op is None or _BINARY_PRECEDENCE[op] < min_precedence:
                break
            self.i += 1
            is_bool = False
            if self.at("ident", "bool"):
                if op not in _COMPARISONS:
                    raise self.fail(f"'bool' after non-comparison {op!r}")
                self.i += 1
                is_bool = True
            matching = None
            if self.at("ident", "on") or self.at("ident", "ignoring"):
                matching = (self.take("ident").text, self.label_list())
                if self.at("ident", "group_left") or self.at("ident", "group_right"):
                    self.i += 1
                    if self.at("op", "("):
                        self.label_list()
            right_precedence = _BINARY_PRECEDENCE[op] + (0 if op == "^" else 1)
            right = self.expression(right_precedence)
            left = self.combine(op, left, right, is_bool, matching)
        return left

    def combine(self, op: str, left: Value, right: Value, is_bool: bool, matching) -> Value:
        for side in (left, right):
            if side.type not in ("scalar", "vector"):
                raise self.fail(f"operator {op!r} on a {side.type}")
        if op in _SET_OPS and "scalar" in (left.type, right.type):
            raise self.fail(f"set operator {op!r} needs vectors on both sides")
        if left.type == right.type == "scalar":
            if op in _COMPARISONS and not is_bool:
                raise self.fail("comparison between scalars needs 'bool'")
            return Value("scalar")
        if left.type == "scalar" or right.type == "scalar":
            vector = left if left.type == "vector" else right
            return Value("vector", vector.labels, vector.exact, vector.open)
        # vector <op> vector
        if matching is not None:
            kind, labels = matching
            for side in (left, right):
                self.require_labels(labels, side, f"{kind}(...)")
            if kind == "on":
                return Value("vector", frozenset(labels), exact=True)
            return Value("vector", left.labels - frozenset(labels), left.exact, left.open)
        if op not in _SET_OPS and not (left.open or right.open):
            # One-to-one matching on all labels: both sides must end with the same label set, or the
            # result is silently empty.
            if left.exact and right.exact and left.labels != right.labels:
                raise self.fail(f"{op!r} between vectors labelled {sorted(left.labels)} and "
                                f"{sorted(right.labels)} matches nothing (add on(...) or aggregate alike)")
            if left.exact != right.exact:
                raise self.fail(f"{op!r} between an aggregated and a raw vector: use on(...) or aggregate both")
        return Value("vector", left.labels, left.exact, left.open or right.open)

    def unary(self) -> Value:
        if self.at("op", "-") or self.at("op", "+"):
            self.i += 1
            value = self.unary()
            if value.type not in ("scalar", "vector"):
                raise self.fail(f"unary sign on a {value.type}")
            return value
        return self.postfix(self.primary())

    def postfix(self, value: Value) -> Value:
        if self.at("ident", "offset"):
            self.i += 1
            negative = self.at("op", "-")
            if negative:
                self.i += 1
            duration = self.peek()
            if duration is None or not (duration.kind in ("num", "ident") and _DURATION.match(duration.text)):
                raise self.fail("offset needs a duration")
            self.i += 1
        return value

    def primary(self) -> Value:
        token = self.peek()
        if token is None:
            raise self.fail("unexpected end of expression")
        if token.kind == "num":
            self.i += 1
            return Value("scalar")
        if token.kind == "str":
            self.i += 1
            return Value("string")
        if token.kind == "op" and token.text == "(":
            self.i += 1
            value = self.expression(0)
            self.take("op", ")")
            return value
        if token.kind == "op" and token.text == "{":
            raise self.fail("selectors must name their metric")
        if token.kind != "ident":
            raise self.fail(f"unexpected {token.text!r} at {token.pos}")
        name = token.text
        if name in ("Inf", "NaN"):
            self.i += 1
            return Value("scalar")
        if name in _AGGREGATIONS:
            return self.aggregation()
        nxt = self.peek(1)
        if nxt is not None and nxt.kind == "op" and nxt.text == "(":
            return self.function()
        return self.selector()

    def label_list(self) -> list[str]:
        self.take("op", "(")
        labels: list[str] = []
        while not self.at("op", ")"):
            label = self.take("ident").text
            if ":" in label:
                raise self.fail(f"invalid label name {label!r}")
            labels.append(label)
            if not self.at("op", ")"):
                self.take("op", ",")
        self.take("op", ")")
        return labels

    def aggregation(self) -> Value:
        name = self.take("ident").text
        grouping = None
        if self.at("ident", "by") or self.at("ident", "without"):
            grouping = (self.take("ident").text, self.label_list())
        self.take("op", "(")
        if name in _AGG_WITH_PARAM:
            param = self.expression(0)
            if param.type != _AGG_WITH_PARAM[name]:
                raise self.fail(f"{name} needs a {_AGG_WITH_PARAM[name]} parameter")
            self.take("op", ",")
        inner = self.expression(0)
        self.take("op", ")")
        if self.at("ident", "by") or self.at("ident", "without"):
            if grouping is not None:
                raise self.fail(f"{name} has two grouping clauses")
            grouping = (self.take("ident").text, self.label_list())
        if inner.type != "vector":
            raise self.fail(f"{name}(...) needs an instant vector, got a {inner.type}")
        if grouping is None:
            return Value("vector", frozenset(), exact=True)
        kind, labels = grouping
        self.require_labels(labels, inner, f"{name} {kind} (...)")
        if kind == "by":
            return Value("vector", frozenset(labels), exact=True)
        return Value("vector", inner.labels - frozenset(labels), inner.exact, inner.open)

    def function(self) -> Value:
        token = self.take("ident")
        if token.text not in _FUNCTIONS:
            raise self.fail(f"unknown function {token.text!r}")
        types, required, result = _FUNCTIONS[token.text]
        self.take("op", "(")
        args: list[Value] = []
        while not self.at("op", ")"):
            args.append(self.expression(0))
            if not self.at("op", ")"):
                self.take("op", ",")
        self.take("op", ")")
        if not required <= len(args) <= len(types):
            raise self.fail(f"{token.text}() takes {required}..{len(types)} arguments, got {len(args)}")
        for index, (arg, expected) in enumerate(zip(args, types, strict=False)):
            if arg.type != expected:
                raise self.fail(f"argument {index + 1} of {token.text}() must be a {expected}, got a {arg.type}")
        if result != "vector":
            return Value(result)
        source = next((a for a in args if a.type in ("vector", "matrix")), Value("vector", exact=True))
        if token.text == "histogram_quantile":
            if not (source.open or "le" in source.labels):
                raise self.fail("histogram_quantile() over a vector without the 'le' label")
            return Value("vector", source.labels - {"le"}, source.exact, source.open)
        return Value("vector", source.labels, source.exact, source.open)

    def selector(self) -> Value:
        name = self.take("ident").text
        if name in ("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                    "unless"):
            raise self.fail(f"misplaced keyword {name!r}")
        if name not in self.series:
            raise self.fail(f"unknown metric {name!r}")
        self.metrics.add(name)
        known = self.series[name]
        matchers: list[tuple[str, str, str]] = []
        if self.at("op", "{"):
            self.i += 1
            while not self.at("op", "}"):
                label = self.take("ident").text
                op = self.take("op").text
                if op not in ("=", "!=", "=~", "!~"):
                    raise self.fail(f"bad matcher operator {op!r}")
                value = self.take("str").text
                if op in ("=~", "!~"):
                    try:
                        re.compile(value.replace("$model_name", ".*"))
                    except re.error as error:
                        raise self.fail(f"bad regex {value!r}: {error}") from None
                if known is not None and label not in known | TARGET_LABELS:
                    raise self.fail(f"metric {name} has no label {label!r}")
                matchers.append((label, op, value))
                if not self.at("op", "}"):
                    self.take("op", ",")
            self.take("op", "}")
        if ("model_name", "=~", "$model_name") not in matchers:
            raise self.fail(f'selector {name} lacks model_name=~"$model_name"')
        labels = frozenset() if known is None else frozenset(known | TARGET_LABELS)
        value = Value("vector", labels, exact=False, open=known is None)
        if self.at("range"):
            window = self.take("range").text
            if not (_DURATION.match(window) or window in _GRAFANA_INTERVALS):
                raise self.fail(f"bad range [{window}]: use $__rate_interval or a duration such as 1m")
            value = Value("matrix", value.labels, value.exact, value.open)
        return value


def check_promql(expr: str, series: dict[str, set[str] | None]) -> set[str]:
    """Parse and check ``expr``; the metric names it uses."""
    checker = PromQLChecker(expr, series)
    checker.check()
    return checker.metrics


def test_promql_checker_rejects_broken_expressions():
    series = dict(TEXTSCYTHE_SERIES)
    m = 'model_name=~"$model_name"'
    good = f"sum by (selector) (rate(textscythe_selector_fallbacks_total{{{m}}}[$__rate_interval]))"
    assert check_promql(good, series) == {"textscythe_selector_fallbacks_total"}
    bad = [
        f"sum by (selector) (rate(textscythe_selector_fallbacks_total{{{m}}}[$__rate_interval])",  # unbalanced
        f"sum(rate(textscythe_selector_fallbacks_total{{{m}}}[$__rate_interval]])",  # stray bracket
        f"sum(rate(textscythe_selector_fallbacks_total{{{m}}}))",  # rate of an instant vector
        f"sum(textscythe_selector_fallbacks_total{{{m}}}[5m])",  # sum of a range vector
        f"sum(rate(textscythe_fallbacks_total{{{m}}}[1m]))",  # unknown metric
        "sum(rate(textscythe_selector_fallbacks_total[1m]))",  # no model_name filter
        f"sum by (budget_bucket) (rate(textscythe_selector_fallbacks_total{{{m}}}[1m]))",  # no such label
        f"histogram_quantile(0.5, sum by (selector) (rate(textscythe_pruning_ratio_bucket{{{m}}}[1m])))",  # no le
        f"histogram_quantile(sum by (le) (rate(textscythe_pruning_ratio_bucket{{{m}}}[1m])))",  # arity
        f"sum by (selector) (rate(textscythe_requests_total{{{m}}}[1m])) / sum(rate(textscythe_requests_total{{{m}}}[1m]))",
        f"rate(textscythe_requests_total{{{m}}}[1x])",  # bad duration
        f"sum(rate(textscythe_requests_total{{{m}}}[1m])) sum(rate(textscythe_requests_total{{{m}}}[1m]))",
    ]
    for expr in bad:
        with pytest.raises(PromQLError):
            check_promql(expr, series)


def test_metric_list_matches_the_plugins_metrics_module():
    """The names and labels above are the ones textscythe_vllm/metrics.py declares (read as text: no import)."""
    source = (ROOT / "textscythe_vllm" / "metrics.py").read_text()
    pattern = re.compile(r"\b(Counter|Histogram)\(\s*\"(textscythe_[a-z0-9_]+)\"\s*,\s*(?:\"(?:[^\"\\]|\\.)*\"\s*)+,"
                         r"\s*\[([^\]]*)\]")
    declared = {name: (kind, set(re.findall(r"\"([^\"]+)\"", labels))) for kind, name, labels in pattern.findall(source)}
    expected = {**{n: ("Counter", labels) for n, labels in _TS_COUNTERS.items()},
                **{n: ("Histogram", labels) for n, labels in _TS_HISTOGRAMS.items()}}
    assert declared == expected


def test_vllm_series_names_are_read_from_the_installed_loggers(known_series):
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting"):
        assert name in known_series, name
    assert known_series["vllm:kv_cache_usage_perc"] == {"model_name", "engine"}
    assert "vllm:prompt_tokens" not in known_series  # counters are exposed with _total


# ---------------------------------------------------------------------------------------------------------
# Grafana dashboard


def test_dashboard_identity_and_variable(dashboard, datasource_uid):
    assert dashboard["uid"] == "textscythe"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None  # provisioned dashboards must not carry a database id
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model_name"]
    assert variable["type"] == "query"
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    assert query == "label_values(textscythe_requests_total, model_name)"
    assert variable["datasource"] == {"type": "prometheus", "uid": datasource_uid}
    assert variable["includeAll"] and variable["allValue"] == ".*"


def test_dashboard_panel_ids_are_unique_and_layout_does_not_overlap(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    boxes = []
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        boxes.append((panel["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, (title_a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for title_b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
            assert not overlap, f"panels {title_a!r} and {title_b!r} overlap"


def test_every_panel_and_target_uses_the_provisioned_datasource(dashboard, datasource_uid):
    assert datasource_uid == "prometheus"
    for panel in all_panels(dashboard):
        assert panel.get("datasource") == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource") == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
    assert sum(1 for p in all_panels(dashboard) if p["type"] != "row" and p.get("targets")) >= 10


def test_every_expression_is_valid_promql_over_known_metrics(dashboard, known_series):
    used: set[str] = set()
    for panel, target in all_targets(dashboard):
        expr = target["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), expr
        try:
            used |= check_promql(expr, known_series)
        except PromQLError as error:
            pytest.fail(f"panel {panel['title']!r} target {target['refId']}: {error}")
        # Every metric-name-like word is a known series (a second, independent extraction).
        stripped = re.sub(r"\"[^\"]*\"", '""', expr)
        for word in re.findall(r"\b((?:textscythe_|vllm:)[a-zA-Z0-9_:]*)", stripped):
            assert word in known_series, (panel["title"], word)
    # All of the plugin's metrics are on the dashboard.
    for name in ("textscythe_requests_total", "textscythe_visual_tokens_before_total",
                 "textscythe_visual_tokens_after_total", "textscythe_pruning_ratio_bucket",
                 "textscythe_selector_latency_seconds_bucket", "textscythe_selector_fallbacks_total",
                 "textscythe_request_ttft_seconds_bucket", "textscythe_request_e2e_latency_seconds_bucket"):
        assert name in used, name


def test_dashboard_has_the_required_panels(dashboard):
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in all_panels(dashboard)}
    compact = {title: re.sub(r"\s+", "", e) for title, e in exprs.items()}

    def panel_with(*needles: str) -> str:
        for title, expr in compact.items():
            if all(re.sub(r"\s+", "", n) in expr for n in needles):
                return title
        raise AssertionError(f"no panel has all of {needles}")

    m = 'model_name=~"$model_name"'
    panel_with("1-sum(rate(textscythe_visual_tokens_after_total", "/(sum(rate(textscythe_visual_tokens_before_total",
               "histogram_quantile(", "textscythe_pruning_ratio_bucket")
    panel_with("(rate(textscythe_visual_tokens_before_total", ")-sum", "(rate(textscythe_visual_tokens_after_total")
    latency = panel_with("histogram_quantile(0.5,sumby(le,selector)(rate(textscythe_selector_latency_seconds_bucket",
                         "histogram_quantile(0.95,", "histogram_quantile(0.99,")
    assert "$__rate_interval" in exprs[latency]
    ttft = panel_with("histogram_quantile(0.5,sumby(le,budget_bucket)(rate(textscythe_request_ttft_seconds_bucket",
                      "histogram_quantile(0.95,")
    e2e = panel_with("histogram_quantile(0.5,sumby(le,budget_bucket)(rate(textscythe_request_e2e_latency_seconds_bucket",
                     "histogram_quantile(0.95,")
    by_title = {p["title"]: p for p in all_panels(dashboard)}
    # TTFT and e2e by budget bucket side by side.
    g_ttft, g_e2e = by_title[ttft]["gridPos"], by_title[e2e]["gridPos"]
    assert g_ttft["y"] == g_e2e["y"] and g_ttft["x"] + g_ttft["w"] <= g_e2e["x"]
    panel_with("sumby(budget_bucket)(rate(textscythe_requests_total")
    panel_with("sumby(selector)(rate(textscythe_requests_total")
    panel_with("increase(textscythe_selector_fallbacks_total")
    panel_with("rate(vllm:prompt_tokens_total", "rate(vllm:generation_tokens_total")
    panel_with("histogram_quantile(", "rate(vllm:time_to_first_token_seconds_bucket")
    panel_with("vllm:kv_cache_usage_perc")
    for _, target in all_targets(dashboard):
        assert m in target["expr"]


def test_dashboard_expressions_pass_promtool_when_available(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    rules = []
    for panel, target in all_targets(dashboard):
        expr = (target["expr"].replace("$model_name", ".*").replace("$__rate_interval", "1m")
                .replace("$__range", "1h"))
        rules.append({"record": f"panel_{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# Grafana provisioning, Prometheus, compose


def test_grafana_provisioning():
    datasources = yaml.safe_load(DATASOURCE_PATH.read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(DASHBOARD_PROVIDER_PATH.read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_vllm_server():
    config = yaml.safe_load(PROMETHEUS_PATH.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vllm"]
    assert job["metrics_path"] == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["vllm:8000"]
    assert "kubernetes_sd_configs" in PROMETHEUS_PATH.read_text()  # the k8s discovery comment


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path of a compose service's bind mounts (relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def test_compose_file():
    compose = yaml.safe_load(COMPOSE_PATH.read_text())
    services = compose["services"]
    assert set(services) >= {"vllm", "prometheus", "grafana"}

    vllm = services["vllm"]
    context = (COMPOSE_PATH.parent / vllm["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / vllm["build"]["dockerfile"]).resolve() == DOCKERFILE
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    env = vllm["environment"]
    env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env) if isinstance(env, list) else env
    assert "HF_TOKEN" in env and env["HF_TOKEN"] in (None, "${HF_TOKEN}", "${HF_TOKEN:-}")
    assert env["MODEL"] == "${MODEL:-llava-hf/llava-1.5-7b-hf}"
    assert "8000:8000" in vllm["ports"]
    assert any(v.split(":")[1] == "/root/.cache/huggingface" for v in vllm["volumes"])

    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    mounts = _mounts(prometheus)
    assert (COMPOSE_PATH.parent / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_PATH

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    mounts = _mounts(grafana)
    assert (COMPOSE_PATH.parent / mounts["/etc/grafana/provisioning"]).resolve() == DEPLOY / "grafana" / "provisioning"
    dashboards = (COMPOSE_PATH.parent / mounts["/var/lib/grafana/dashboards"]).resolve()
    assert dashboards == DASHBOARD_PATH.parent and DASHBOARD_PATH.is_file()
    assert "3000:3000" in grafana["ports"]
    for mount in [*_mounts(prometheus).values(), *_mounts(grafana).values()]:
        assert (COMPOSE_PATH.parent / mount).exists(), mount


# ---------------------------------------------------------------------------------------------------------
# Kubernetes


def _k8s(name: str) -> dict:
    (document,) = list(yaml.safe_load_all((K8S / name).read_text()))
    return document


def test_k8s_deployment():
    deployment = _k8s("deployment.yaml")
    assert deployment["apiVersion"] == "apps/v1" and deployment["kind"] == "Deployment"
    spec = deployment["spec"]
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"
    (container,) = pod["spec"]["containers"]
    argv = [*container.get("command", []), *container["args"]]
    assert argv[:2] == ["vllm", "serve"]
    assert argv[argv.index("--middleware") + 1] == MIDDLEWARE
    assert "--trust-request-mm-kwargs" in argv
    assert argv[argv.index("--port") + 1] == "8000" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert all(isinstance(a, str) for a in argv)
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] in ("http", 8000), probe
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["shm"] == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory"


def test_k8s_service_servicemonitor_and_kustomization():
    deployment, service, monitor = _k8s("deployment.yaml"), _k8s("service.yaml"), _k8s("servicemonitor.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["kind"] == "Service" and service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] in ("http", 8000)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"deployment.yaml", "service.yaml", "servicemonitor.yaml"}
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    images = {i["name"] for i in kustomization.get("images", [])}
    container_images = {c["image"].split(":")[0] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images <= container_images


# ---------------------------------------------------------------------------------------------------------
# Dockerfile, .dockerignore, entrypoint


def test_dockerfile_builds_on_the_pinned_vllm_image():
    text = DOCKERFILE.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    from_lines = [line for line in instructions if line.startswith("FROM ")]
    assert from_lines == ["FROM vllm/vllm-openai:v0.33.0"]
    # The image's vLLM is the newest series the plugin supports (textscythe_vllm/_vllm.py, pyproject.toml).
    from textscythe_vllm._vllm import SUPPORTED_VLLM_SERIES, VLLM_REQUIREMENT

    assert from_lines[0].split(":v")[1].startswith(SUPPORTED_VLLM_SERIES[-1] + ".")
    assert f'"{VLLM_REQUIREMENT}",' in (ROOT / "pyproject.toml").read_text()
    assert re.search(r"pip install --no-cache-dir\b.* \.\s*\\?$", text, re.M)
    assert "--no-deps" not in text
    for line in instructions:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["/usr/local/bin/textscythe-entrypoint"]' in instructions
    assert "COPY docker/entrypoint.sh /usr/local/bin/textscythe-entrypoint" in instructions
    assert "CMD []" in instructions


def test_dockerignore_excludes_local_state_but_not_the_sources():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in (".venv", ".git", "artifacts", "benchmarks/results", ".pytest_cache", "**/__pycache__"):
        assert needed in patterns, needed
    for copied in ("pyproject.toml", "README.md", "textscythe_vllm", "docker", "docker/entrypoint.sh"):
        assert copied not in patterns and not any(p.startswith("!") for p in patterns), copied


@pytest.fixture
def fake_vllm(tmp_path) -> dict[str, str]:
    """Environment whose PATH starts with a `vllm` stub printing one argument per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "vllm"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEXTSCYTHE_", "MODEL", "PORT"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["MODEL"] = "llava-hf/llava-1.5-7b-hf"
    return env


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    return subprocess.run([str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)


BASE_ARGV = ["serve", "llava-hf/llava-1.5-7b-hf", "--middleware", MIDDLEWARE, "--trust-request-mm-kwargs",
             "--host", "0.0.0.0", "--port", "8000"]


def test_entrypoint_without_budget(fake_vllm):
    result = run_entrypoint(fake_vllm)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == BASE_ARGV
    extra = run_entrypoint({**fake_vllm, "PORT": "9000"}, "--max-model-len", "4096")
    assert extra.returncode == 0, extra.stderr
    argv = extra.stdout.splitlines()
    assert argv[argv.index("--port") + 1] == "9000"
    assert argv[-2:] == ["--max-model-len", "4096"]


def test_entrypoint_with_default_budget(fake_vllm):
    result = run_entrypoint({**fake_vllm, "TEXTSCYTHE_DEFAULT_BUDGET": "192"}, "--max-model-len", "4096")
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[: len(BASE_ARGV)] == BASE_ARGV
    assert argv.count("--mm-processor-kwargs") == 1
    assert json.loads(argv[argv.index("--mm-processor-kwargs") + 1]) == {"visual_token_budget": 192}
    assert argv[-2:] == ["--max-model-len", "4096"]
    assert run_entrypoint({**fake_vllm, "TEXTSCYTHE_DEFAULT_BUDGET": "1048576"}).returncode == 0


@pytest.mark.parametrize("budget", ["abc", "0", "-5", "64.0", "064", " 64", "1048577", "99999999999999999999"])
def test_entrypoint_rejects_a_bad_budget(fake_vllm, budget):
    result = run_entrypoint({**fake_vllm, "TEXTSCYTHE_DEFAULT_BUDGET": budget})
    assert result.returncode != 0
    assert "TEXTSCYTHE_DEFAULT_BUDGET must be a positive integer" in result.stderr
    assert result.stdout == ""  # vllm was never started


def test_entrypoint_rejects_missing_model_and_conflicting_kwargs(fake_vllm):
    result = run_entrypoint({k: v for k, v in fake_vllm.items() if k != "MODEL"})
    assert result.returncode != 0 and "MODEL is not set" in result.stderr and result.stdout == ""
    result = run_entrypoint({**fake_vllm, "TEXTSCYTHE_DEFAULT_BUDGET": "64"}, "--mm-processor-kwargs", "{}")
    assert result.returncode != 0 and "--mm-processor-kwargs" in result.stderr and result.stdout == ""
    result = run_entrypoint({**fake_vllm, "PORT": "http"})
    assert result.returncode != 0 and "PORT" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# scripts/render_dashboard.py against a fake Prometheus


class FakePrometheus:
    """``/api/v1/query_range`` on 127.0.0.1: two series per query, nothing for fallbacks, an error for one."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                if url.path != "/api/v1/query_range":
                    return self.reply(404, {"status": "error", "error": "not found"})
                owner.queries.append(params)
                query = params["query"]
                if "kv_cache_usage" in query:
                    return self.reply(400, {"status": "error", "errorType": "bad_data", "error": "parse error (test)"})
                if "fallbacks" in query:
                    return self.reply(200, {"status": "success", "data": {"resultType": "matrix", "result": []}})
                start, end, step = float(params["start"]), float(params["end"]), float(params["step"])
                count = int((end - start) // step) + 1
                result = []
                for k, selector in enumerate(("textscythe", "random")):
                    values = [[start + i * step, str(0.2 + 0.1 * k + 0.05 * ((i * (k + 3)) % 7))]
                              for i in range(count)]
                    values[count // 2][1] = "NaN"
                    result.append({"metric": {"model_name": "llava", "selector": selector, "budget_bucket": "<=64",
                                              "instance": "vllm:8000", "engine": "0"}, "values": values})
                return self.reply(200, {"status": "success", "data": {"resultType": "matrix", "result": result}})

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakePrometheus:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def load_render_module():
    spec = importlib.util.spec_from_file_location("render_dashboard", RENDER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_dashboard"] = module
    spec.loader.exec_module(module)
    return module


def test_render_dashboard_reads_the_dashboards_panels(dashboard):
    render = load_render_module()
    panels = render.load_panels(DASHBOARD_PATH)
    timeseries = [p for p in all_panels(dashboard) if p["type"] == "timeseries"]
    assert [p.id for p in panels] == [p["id"] for p in sorted(timeseries, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))]
    expr = render.substitute('rate(x{model_name=~"$model_name"}[$__rate_interval]) [${__range}]',
                             model_name=".*", window="1m", range_seconds=900)
    assert expr == 'rate(x{model_name=~".*"}[1m]) [900s]'
    with pytest.raises(ValueError, match="unknown dashboard variable"):
        render.substitute("x{a=~\"$other\"}", model_name=".*", window="1m", range_seconds=900)
    assert render.legend_for("p50 {{selector}}", {"selector": "textscythe"}) == "p50 textscythe"
    assert render.legend_for("", {"__name__": "up", "job": "vllm"}) == 'up{job="vllm"}'


def test_render_dashboard_against_a_fake_prometheus(tmp_path, dashboard):
    out = tmp_path / "docs" / "dashboard.png"
    env = {**os.environ, "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    with FakePrometheus() as prometheus:
        started = time.time()
        result = subprocess.run(
            [sys.executable, str(RENDER_SCRIPT), "--prometheus", prometheus.url, "--out", str(out), "--minutes", "15"],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
        )
        queries = list(prometheus.queries)
    # One query failed on purpose (the KV-cache panel): the PNG is still written, exit status 1.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "parse error (test)" in result.stderr
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no data" in result.stdout  # the fallbacks panel

    expected = [t["expr"] for p in all_panels(dashboard) if p["type"] == "timeseries" for t in p["targets"]]
    assert len(queries) == len(expected)
    for params in queries:
        assert "$" not in params["query"], params["query"]
        assert 'model_name=~".*"' in params["query"]
        assert "[$__rate_interval]" not in params["query"]
        start, end = float(params["start"]), float(params["end"])
        assert end - start == pytest.approx(900, abs=1)
        assert started - 5 <= end <= time.time() + 5
    assert any("[1m]" in p["query"] for p in queries)


def test_render_dashboard_reports_an_unreachable_prometheus(tmp_path):
    render = load_render_module()
    with FakePrometheus() as prometheus:
        url = prometheus.url  # closed again on exit: nothing listens there afterwards
    assert render.main(["--prometheus", url, "--out", str(tmp_path / "x.png"), "--timeout", "5"]) == 2
    assert not (tmp_path / "x.png").exists()
