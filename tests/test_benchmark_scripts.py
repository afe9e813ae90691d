"""Smoke test of the benchmark scripts at tiny sizes (runs them as a user would, in a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from textscythe_vllm.selectors import available_selectors

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_selector_latency_smoke(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "x.json"
    command = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "selector_latency.py"), "--quick",
        "--sizes", "64", "--dim", "32", "--budgets", "8", "--repeats", "1", "--devices", "cpu",
        "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    results = report["results"]
    assert sorted(r["selector"] for r in results) == available_selectors()
    for entry in results:
        assert entry["median_ms"] > 0
        assert (entry["N"], entry["D"], entry["K"], entry["device"], entry["dtype"]) == (
            64, 32, 8, "cpu", "float32"
        )
        assert len(entry["times_ms"]) == entry["repeats"] == 1
    # the Markdown table names every selector, in the output and next to the JSON; the plot is a PNG
    for name in available_selectors():
        assert f"| {name} |" in done.stdout
        assert f"| {name} |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selector_latency_times_bfloat16_inputs(tmp_path: Path) -> None:
    out = tmp_path / "bf16.json"
    command = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "selector_latency.py"), "--sizes", "40", "--dim", "16",
        "--budgets", "8", "--repeats", "1", "--devices", "cpu", "--dtypes", "float32", "bfloat16",
        "--selectors", "textscythe", "divprune", "--no-plot", "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert sorted((r["selector"], r["dtype"]) for r in results) == [
        ("divprune", "bfloat16"), ("divprune", "float32"), ("textscythe", "bfloat16"), ("textscythe", "float32")
    ]
    assert "**cpu, bfloat16**" in done.stdout and not out.with_suffix(".png").exists()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selector_latency_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _load_script("selector_latency")
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--selectors", "nope", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "unknown selectors" in capsys.readouterr().err
    defaults = script.parse_args([])
    assert (defaults.sizes, defaults.dim, defaults.budgets, defaults.text_tokens) == ([576, 2880], 4096,
                                                                                       [64, 192, 320], 40)
    assert defaults.selectors == available_selectors()
    assert defaults.out == REPO_ROOT / "benchmarks" / "results" / "selector_latency.json"
    quick = script.parse_args(["--quick"])
    assert (quick.sizes, quick.budgets, quick.repeats, quick.dtypes) == ([576], [64], 2, ["float32"])
    assert defaults.dtypes == ["float32", "bfloat16"]
