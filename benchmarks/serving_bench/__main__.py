"""``python benchmarks/serving_bench`` (or ``python -m serving_bench`` from ``benchmarks/``): the same as
``python benchmarks/serving.py``."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a directory: make the package importable by name
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving_bench.cli import main

sys.exit(main())
