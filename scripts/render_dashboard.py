#!/usr/bin/env python3
"""Render the Grafana dashboard's time-series panels from a Prometheus into one PNG, without Grafana.

Reads the panels of ``deploy/grafana/dashboards/textscythe.json``, substitutes the dashboard variables
(``$model_name`` -> ``--model-name``, default ``.*``; ``$__rate_interval`` / ``$__interval`` -> ``--window``,
default ``1m``; ``$__range`` -> the rendered time range), runs every target through Prometheus' HTTP API
``/api/v1/query_range`` over the last ``--minutes`` and draws one subplot per panel, one line per series,
with the panel's legend format::

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 15 --out docs/dashboard.png

Exit status: 0 when the PNG was written, 1 when it was written but some query failed (the panel shows the
error), 2 when Prometheus could not be reached or the arguments / dashboard are unusable. Only the standard
library and matplotlib (Agg backend) are used.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "textscythe.json"
DEFAULT_OUT = Path("docs") / "dashboard.png"

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_VARIABLE = re.compile(r"\$(\{[^}]*\}|[a-zA-Z_][a-zA-Z0-9_]*)")


class PrometheusUnreachable(RuntimeError):
    """Prometheus did not answer at all (connection refused, DNS, timeout)."""


class QueryError(RuntimeError):
    """Prometheus answered, but with an error for this query (bad PromQL, timeout on its side)."""


@dataclass
class Query:
    ref_id: str
    expr: str
    legend: str


@dataclass
class Series:
    label: str
    times: list[float]
    values: list[float]


@dataclass
class Panel:
    id: int
    title: str
    unit: str
    queries: list[Query]
    series: list[Series] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load_panels(dashboard_path: Path, panel_types: tuple[str, ...] = ("timeseries",)) -> list[Panel]:
    """The dashboard's panels of the given types, in reading order (top to bottom, left to right)."""
    dashboard = json.loads(Path(dashboard_path).read_text())

    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for panel in panels:
            found.append(panel)
            found.extend(walk(panel.get("panels", [])))  # panels inside collapsed rows
        return found

    selected = [p for p in walk(dashboard.get("panels", [])) if p.get("type") in panel_types]
    selected.sort(key=lambda p: (p.get("gridPos", {}).get("y", 0), p.get("gridPos", {}).get("x", 0)))
    panels = []
    for p in selected:
        queries = [
            Query(t.get("refId", "?"), t["expr"], t.get("legendFormat", ""))
            for t in p.get("targets", [])
            if t.get("expr") and not t.get("hide")
        ]
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        panels.append(Panel(id=p.get("id", 0), title=p.get("title", ""), unit=unit, queries=queries))
    return panels


def substitute(expr: str, *, model_name: str, window: str, range_seconds: int) -> str:
    """Replace Grafana's variables in ``expr``; any variable left over is an error."""
    values = {
        "model_name": model_name,
        "__rate_interval": window,
        "__interval": window,
        "__range": f"{range_seconds}s",
        "__range_s": str(range_seconds),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1).strip("{}").split(":", 1)[0]  # ${var} and ${var:format}
        if name not in values:
            raise ValueError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def query_range(base_url: str, expr: str, start: float, end: float, step: float, timeout: float) -> list[dict]:
    """``/api/v1/query_range``: the matrix result (a list of ``{"metric": {...}, "values": [[t, "v"], ...]}``)."""
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    url = f"{base_url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:  # 400 bad query, 422 cannot execute, 503 timeout
        try:
            message = json.loads(error.read().decode("utf-8")).get("error", str(error))
        except (ValueError, OSError):
            message = str(error)
        raise QueryError(f"HTTP {error.code}: {message}") from None
    except (urllib.error.URLError, OSError) as error:
        raise PrometheusUnreachable(f"cannot reach Prometheus at {base_url}: {error}") from None
    except ValueError as error:
        raise QueryError(f"response is not JSON: {error}") from None
    if body.get("status") != "success":
        raise QueryError(body.get("error", "query failed"))
    data = body.get("data", {})
    if data.get("resultType") != "matrix":
        raise QueryError(f"expected a matrix result, got {data.get('resultType')!r}")
    return data.get("result", [])


def legend_for(legend_format: str, metric: dict[str, str]) -> str:
    if legend_format and legend_format != "__auto":
        return _LEGEND_LABEL.sub(lambda m: metric.get(m.group(1), ""), legend_format)
    name = metric.get("__name__", "")
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{labels}}}" if labels or not name else name


def _to_float(value: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def collect(
    panels: list[Panel],
    *,
    prometheus: str,
    model_name: str,
    window: str,
    minutes: float,
    step: float | None,
    timeout: float,
    end: float | None = None,
) -> None:
    """Run every panel's queries; fills ``panel.series`` and ``panel.errors``."""
    end = time.time() if end is None else end
    range_seconds = max(1, round(minutes * 60))
    start = end - range_seconds
    step = step or max(5.0, float(range_seconds // 300))
    for panel in panels:
        for query in panel.queries:
            expr = substitute(query.expr, model_name=model_name, window=window, range_seconds=range_seconds)
            try:
                result = query_range(prometheus, expr, start, end, step, timeout)
            except QueryError as error:
                panel.errors.append(f"{query.ref_id}: {error}")
                continue
            for item in result:
                values = item.get("values", [])
                panel.series.append(
                    Series(
                        label=legend_for(query.legend, item.get("metric", {})),
                        times=[float(t) for t, _ in values],
                        values=[_to_float(v) for _, v in values],
                    )
                )


def _formatter(unit: str):
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    if unit == "percentunit":
        return PercentFormatter(1.0)
    if unit == "s":
        return FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.3g} s")
    return None


_UNIT_LABELS = {"reqps": "requests / s", "short": "", "s": "", "percentunit": ""}


def render(panels: list[Panel], out: Path, *, title: str, columns: int = 2, max_legend: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    columns = max(1, min(columns, len(panels) or 1))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(8 * columns, 3.8 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        panel = panels[index]
        ax.set_title(panel.title, fontsize=11, loc="left")
        drawn = 0
        for series in panel.series:
            if not any(math.isfinite(v) for v in series.values):
                continue
            times = [datetime.fromtimestamp(t, tz=timezone.utc) for t in series.times]
            ax.plot(times, series.values, linewidth=1.5, label=series.label if drawn < max_legend else None)
            drawn += 1
        if drawn == 0:
            message = "no data" if not panel.errors else "query error:\n" + "\n".join(panel.errors)[:300]
            ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
                    fontsize=12 if not panel.errors else 8, color="grey" if not panel.errors else "firebrick",
                    wrap=True)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            locator = mdates.AutoDateLocator(tz=timezone.utc, maxticks=8)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc))
            formatter = _formatter(panel.unit)
            if formatter is not None:
                ax.yaxis.set_major_formatter(formatter)
            if _UNIT_LABELS.get(panel.unit, panel.unit):
                ax.set_ylabel(_UNIT_LABELS.get(panel.unit, panel.unit), fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7, loc="upper left", framealpha=0.7)
            if panel.errors:
                ax.text(0.99, 0.02, "some queries failed", ha="right", va="bottom", transform=ax.transAxes,
                        fontsize=7, color="firebrick")
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="Grafana dashboard JSON")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default docs/dashboard.png)")
    parser.add_argument("--minutes", type=float, default=15.0, help="time range: the last N minutes (default 15)")
    parser.add_argument("--window", default="1m", help="value of $__rate_interval / $__interval (default 1m)")
    parser.add_argument("--model-name", default=".*", help="regex for $model_name (default .*: all models)")
    parser.add_argument("--step", type=float, default=None, help="query resolution in seconds (default: auto)")
    parser.add_argument("--columns", type=int, default=2, help="subplots per row (default 2)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per query (default 30)")
    args = parser.parse_args(argv)
    if not _DURATION.match(args.window):
        parser.error(f"--window must be a Prometheus duration such as 1m or 30s, got {args.window!r}")
    if args.minutes <= 0:
        parser.error("--minutes must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        panels = load_panels(args.dashboard)
    except (OSError, ValueError, KeyError) as error:
        print(f"render_dashboard: cannot read dashboard {args.dashboard}: {error}", file=sys.stderr)
        return 2
    if not panels:
        print(f"render_dashboard: no time-series panels in {args.dashboard}", file=sys.stderr)
        return 2
    try:
        collect(panels, prometheus=args.prometheus, model_name=args.model_name, window=args.window,
                minutes=args.minutes, step=args.step, timeout=args.timeout)
    except PrometheusUnreachable as error:
        print(f"render_dashboard: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"render_dashboard: {error}", file=sys.stderr)
        return 2
    dashboard_title = json.loads(args.dashboard.read_text()).get("title", "dashboard")
    now = datetime.now(tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"{dashboard_title} - last {args.minutes:g} min to {now} - {args.prometheus}"
    render(panels, args.out, title=title, columns=args.columns)
    for panel in panels:
        state = f"{len(panel.series)} series" if panel.series else "no data"
        print(f"  [{panel.id:>2}] {panel.title}: {state}" + (f" ({len(panel.errors)} failed)" if panel.errors else ""))
    failed = sum(len(p.errors) for p in panels)
    print(f"wrote {args.out} ({len(panels)} panels{f', {failed} failed queries' if failed else ''})")
    for panel in panels:
        for message in panel.errors:
            print(f"render_dashboard: panel {panel.title!r}: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
