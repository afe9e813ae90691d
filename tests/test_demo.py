"""The main job, end to end in a reduced form (one timed round, a 2-layer 7B-shaped LLM): what it prints is what
the README promises -- different questions keep different patches, the asked shape is kept, the key word is
found, and pruned requests reach their first token sooner."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    run = subprocess.run(
        [sys.executable, "-m", "textscythe_dev.demo", "--workdir", str(workdir), "--rounds", "1",
         "--llm-layers", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout, json.loads((workdir / "results.json").read_text()), workdir


def table_rows(stdout: str, header: str) -> list[list[str]]:
    block = stdout[stdout.index(header):].split("\n\n")[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()
            if line.startswith("| ") and not line.startswith("| question") and not line.startswith("| budget")]


def test_the_question_decides_what_is_kept(demo):
    stdout, results, workdir = demo
    assert "different kept sets for different questions: True" in stdout
    rows = table_rows(stdout, "What the question keeps")
    assert [row[0] for row in rows] == ["where is the red rectangle ?", "where is the blue circle ?",
                                        "where is the yellow square ?"]
    for row, colour in zip(rows, ("red", "blue", "yellow"), strict=True):
        assert row[1] == colour  # the key word TextScythe found
        kept, total = map(int, re.match(r"(\d+)/(\d+)", row[2]).groups())
        on_shape = int(row[3].rstrip("%"))
        if colour == "red":  # a quarter of the image: more patches than the budget, so every kept token is red
            assert on_shape >= 90
        else:  # small shapes: (nearly) all of the shape is kept
            assert kept / total >= 0.9
    guided = {row["colour"]: row for row in results["guidance"]}
    assert guided["red"]["kept_on_asked_shape"] >= 0.9
    assert guided["blue"]["asked_share_kept"] >= 0.9 and guided["yellow"]["asked_share_kept"] >= 0.9
    assert (workdir / "demo.png").stat().st_size > 10_000


def test_pruned_requests_reach_the_first_token_sooner(demo):
    stdout, results, _ = demo
    rows = {row[0]: row for row in table_rows(stdout, "How fast")}
    assert set(rows) == {"none", "192", "64"}
    ttft = {budget: float(row[2]) for budget, row in rows.items()}
    assert ttft["64"] < ttft["none"] and ttft["192"] < ttft["none"]
    prompt_tokens = {budget: int(row[1]) for budget, row in rows.items()}
    assert prompt_tokens["none"] - prompt_tokens["192"] == 576 - 192
    assert prompt_tokens["none"] - prompt_tokens["64"] == 576 - 64
    assert "CPU cores" in stdout and results["speed"]["llm_layers"] == 2
