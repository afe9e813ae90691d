#!/usr/bin/env bash
# The main job: set up .venv (first run: several minutes), then serve a tiny local LLaVA with real
# `vllm serve` + the textscythe plugin and ask it one question with budgets none/192/64.
# Extra arguments go to `python -m textscythe_dev.demo` (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m textscythe_dev.demo "$@"
