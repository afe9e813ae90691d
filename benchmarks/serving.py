"""End-to-end serving benchmark: what does a visual-token budget buy on a real ``vllm serve`` with the plugin?

The entry script of the ``benchmarks/serving_bench/`` package (flops, client, analysis, report, cli), whose
docstring describes the method; docs/benchmarks.md section 5 the results.

    python benchmarks/serving.py                          # LLaVA-1.5-shaped, ~13-20 min on 2 cores
    python benchmarks/serving.py --shape llava-next       # 2,928 visual tokens -> 320, ~19-23 min
    python benchmarks/serving.py --shape qwen3-vl-8b      # 1,024 visual tokens -> 256 / 102 (25% / 10%), ~30-35 min
    python benchmarks/serving.py --quick                  # smoke run: tiny widths, ~1.5-3 min
    python benchmarks/serving.py --reanalyse benchmarks/results/serving.json --out /tmp/s.json  # no server
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:  # the package next to this file, also when this file is loaded by path
    sys.path.insert(0, str(BENCHMARKS_DIR))

from serving_bench.cli import main, parse_args  # noqa: E402

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
