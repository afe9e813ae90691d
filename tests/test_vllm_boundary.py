"""One home for vLLM internals (``textscythe_vllm/_vllm.py``): no other module of the shipped package imports a
vLLM module below the top-level package, or names a private (underscore) attribute of the vLLM modules the plugin
extends. The private names are read off the installed vLLM's own source, so the check follows vLLM upgrades."""

from __future__ import annotations

import re
from pathlib import Path

import vllm

PACKAGE = Path(__file__).resolve().parents[1] / "textscythe_vllm"
VLLM = Path(vllm.__file__).resolve().parent


def _reexported_modules() -> list[str]:
    """Every vLLM module ``_vllm.py`` re-exports from (each family's model module among them)."""
    from textscythe_vllm import _vllm

    modules = {module for module, _ in _vllm._LAZY.values()}
    return sorted(module.removeprefix("vllm.").replace(".", "/") + ".py" for module in modules
                  if (VLLM / (module.removeprefix("vllm.").replace(".", "/") + ".py")).is_file())


#: The vLLM modules whose classes the plugin subclasses or whose functions it calls: everything re-exported, plus
#: the processing package and the towers and helpers the families' models are built from.
EXTENDED = sorted({
    "multimodal/processing", "multimodal/hasher.py", "multimodal/inputs.py", "multimodal/parse.py",
    "multimodal/registry.py", "model_executor/models/interfaces.py", "model_executor/models/intern_vit.py",
    "model_executor/models/interns1_vit.py", "model_executor/models/qwen2_vl.py",
    *_reexported_modules(),
})
PRIVATE = re.compile(r"(?:\bdef |\.|\bimport |, )(_[a-z][A-Za-z0-9_]*)")


def shipped_modules() -> list[Path]:
    """The package's modules users run (the test and demo scaffolding lives in textscythe_dev/, outside the wheel)."""
    return [path for path in PACKAGE.rglob("*.py")
            if path.name != "_vllm.py"]


def vllm_private_names() -> set[str]:
    names: set[str] = set()
    for entry in EXTENDED:
        path = VLLM / entry
        for source in ([path] if path.is_file() else sorted(path.glob("*.py"))):
            names |= set(re.findall(r"(?:\bdef |\bself\.|^)(_[a-z][A-Za-z0-9_]*)", source.read_text(), re.M))
    return names


def test_only_the_home_imports_vllm_internals():
    offenders = []
    for path in shipped_modules():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from vllm\.|import vllm\.)", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_only_the_home_names_vllm_private_attributes():
    private = vllm_private_names()
    assert {"_get_mm_hashes", "_parse_and_validate_multimodal_inputs", "_iter_mm_grid_hw",
            "_process_vision_input"} <= private  # the check reads real names, of every family's module
    offenders = []
    for path in shipped_modules():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in PRIVATE.findall(line):
                if name in private:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {name}")
    assert not offenders, offenders


def test_the_check_can_fail(tmp_path):
    sample = "    def _get_mm_hashes(self, inputs):\n        return self._parse_and_validate_multimodal_inputs()\n"
    assert {"_get_mm_hashes", "_parse_and_validate_multimodal_inputs"} <= set(PRIVATE.findall(sample)) & \
        vllm_private_names()


def test_the_wheel_ships_the_plugin_only():
    """``textscythe_dev`` (tiny models, test servers, the demo) is outside the wheel, so nothing shipped may
    import it, and the package finder must not pick it up."""
    import tomllib
    from setuptools import find_packages

    include = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"]["include"]
    shipped = find_packages(where=str(PACKAGE.parent), include=include)
    assert "textscythe_vllm" in shipped and "textscythe_vllm.selectors" in shipped
    assert not [name for name in shipped if not name.startswith("textscythe_vllm")], shipped
    offenders = [f"{path.relative_to(PACKAGE)}: {line.strip()}" for path in PACKAGE.rglob("*.py")
                 for line in path.read_text().splitlines() if re.search(r"\btextscythe_dev\b", line)]
    assert not offenders, offenders
