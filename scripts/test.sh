#!/usr/bin/env bash
# The test command: set up .venv (first run: several minutes), lint, then run the whole test suite
# (unit tests, selector reference tests, and real `vllm serve` / `vllm.LLM` processes on tiny local models).
# Extra arguments go to pytest (e.g. `-k middleware`, `-m "not server"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh --with-prometheus
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
