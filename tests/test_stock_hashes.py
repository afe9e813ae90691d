"""docs/configuration.md: "Requests without a budget are processed exactly as by stock vLLM (same placeholders,
hashes and outputs)" -- the hashes and placeholders, for every family: the plugin's processor against stock
vLLM's (``VLLM_PLUGINS=``), on identical inputs (one image, two images of different sizes, image + video)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def checkpoints(tiny_llava_dir, tiny_llava_next_dir, tmp_path_factory):
    from textscythe_dev.tiny_onevision import build_tiny_onevision
    from textscythe_dev.tiny_qwen import build_tiny_qwen2_5_vl

    return {
        "llava-1.5": tiny_llava_dir, "llava-next": tiny_llava_next_dir,
        "qwen2.5-vl": build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen")),
        "onevision": build_tiny_onevision(tmp_path_factory.mktemp("onevision")),
    }


def run_probe(directories, out, plugins: str | None):
    env = dict(os.environ)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    done = subprocess.run([sys.executable, "-m", "textscythe_dev.hash_probe", str(out), *map(str, directories)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_no_budget_hashes_and_placeholders_are_stock(checkpoints, tmp_path):
    directories = list(checkpoints.values())
    ours = run_probe(directories, tmp_path / "ours.json", None)
    stock = run_probe(directories, tmp_path / "stock.json", "")
    for family, directory in checkpoints.items():
        mine, theirs = ours[str(directory)], stock[str(directory)]
        assert mine.pop("processor").startswith("TextScythe"), family  # the plugin's processor did run ...
        assert not theirs.pop("processor").startswith("TextScythe"), family  # ... and the stock one here
        assert mine == theirs, family
        assert len(mine) >= 2
