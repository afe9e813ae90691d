#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (PyTorch + CUDA and transformers installed, no vLLM, nothing fetchable):
# the selectors' tests on CUDA (the CUDA-only ones included: device preservation, the greedy fill without host
# syncs) and the selector timings on CUDA, next to the CLIP-L encoder. One command, under 8 minutes on an H100;
# results go to $OUT (or artifacts/gpu-check/): pytest's JUnit XML and log, selector_latency_cuda.json and
# selector_overhead_cuda.json with their .md tables.
#
#   bash scripts/gpu_check.sh --prepare      # here, once: pip-download the test tools into .gpu_wheels/
#   bash scripts/gpu_check.sh                # on the GPU machine (the device tool: carry .gpu_wheels)
#
# No vLLM is imported: the selectors are pure PyTorch, and the suites below never start a server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=.gpu_wheels
if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    .venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --dest "$WHEELS" \
        pytest hypothesis numpy matplotlib
    ls "$WHEELS"
    exit 0
fi
OUT_DIR="${OUT:-artifacts/gpu-check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF
missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('pytest','hypothesis','numpy','matplotlib') if u.find_spec(m) is None))")
if [[ -n "$missing" ]]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 1. selector suites on CUDA (tests that need no vLLM); the CUDA-only tests run here instead of skipping
timeout 240 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/pytest-cuda.xml" \
    tests/test_selectors_common.py tests/test_greedy_fill.py tests/test_textscythe_reference.py tests/test_baselines.py \
    2>&1 | tee "$OUT_DIR/pytest-cuda.log" | tail -5
# 2. selector latency on CUDA (float32, bfloat16), and the overhead next to the CLIP-L encoder on CUDA
timeout 150 "$PY" benchmarks/selector_latency.py --devices cuda --no-plot --out "$OUT_DIR/selector_latency_cuda.json" \
    | tail -25
timeout 150 "$PY" benchmarks/selector_overhead.py --device cuda --selectors textscythe cls_attention divprune \
    --repeats 10 --no-plot --out "$OUT_DIR/selector_overhead_cuda.json" | tail -15
