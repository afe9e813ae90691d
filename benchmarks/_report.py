"""Report writing shared by the benchmark scripts: JSON, the Markdown table next to it (``.md``) and a plot
(``.png``), all in ``benchmarks/results/`` by default. Importing it also puts the checkout (``REPO_ROOT``) on
``sys.path``, so the scripts run without installing the package.

    from _report import pyplot, save_figure, show, write_report

    show(header, table)                                    # prints the header, a blank line and the table
    write_report(args.out, report, header, table, None if args.no_plot else plot)

``plot(report, path)`` draws with :func:`pyplot` (matplotlib on the Agg backend) and ends with
:func:`save_figure`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the scripts run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))
PLOT_DPI = 120


def show(header: str, table: str) -> None:
    """Print the report's header and its Markdown table (what the ``.md`` file holds)."""
    print(header)
    print()
    print(table)


def write_report(out: Path, report: dict[str, Any], header: str, table: str,
                 plot: Callable[[dict[str, Any], Path], None] | None = None, *,
                 ensure_ascii: bool = True) -> list[Path]:
    """Write ``out`` (the JSON report), ``out.md`` (header + table) and, given ``plot``, ``out.png``; print
    and return the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=ensure_ascii) + "\n")
    out.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    written = [out, out.with_suffix(".md")]
    if plot is not None:
        plot(report, out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return written


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Lay the figure out, save it as a PNG and close it."""
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)
    pyplot().close(figure)
