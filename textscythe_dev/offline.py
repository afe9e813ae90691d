"""Run one vLLM configuration offline (``vllm.LLM``) in a subprocess, for the equivalence tests.

vLLM's offline engine spawns processes and its model registry / plugin state is process-global, so every
configuration the equivalence tests compare (with the plugin, stock vLLM with ``VLLM_PLUGINS=``) runs in a fresh
``python -m textscythe_dev.offline SPEC.json`` subprocess. Test side: :func:`start_runner` writes the
spec and starts it, :func:`finish_runner` waits and reads the results. Spec::

    {
      "model": "/path/to/checkpoint",
      "env": {"VLLM_PLUGINS": ""},              # optional, applied before vLLM is imported
      "llm_kwargs": {...},                       # optional, extra ``vllm.LLM`` arguments
      "requests": [
        {"id": "q1-k64", "prompt": "USER: <image>\\n... ASSISTANT:",
         "images": [{"seed": 1, "width": 336, "height": 336}],        # testing.images.scene (336 x 336 default)
         "videos": [{"seed": 2, "frames": 8, "width": 168, "height": 112}],  # testing.tiny_qwen.tiny_video
         "mm_processor_kwargs": {"visual_token_budget": 64, "visual_token_selector": "textscythe"},
         "max_tokens": 8}
      ],
      "solo": true,                              # also run every request on its own (default true)
      "chat": [{"id": ..., "messages": [{"role": "user", "text": "...", "images": [{"seed": 1}]}],
                "mm_processor_kwargs": {...}, "max_tokens": 4}],   # optional: LLM.chat conversations
      "probe": [...],                            # optional, LLaVA: model-side values read inside the worker
      "probe_items": "/path/to/items.pt",        # optional, Qwen2.5-VL: the same from torch.save'd pixels
      "output": "/path/to/results.json"
    }

Results: ``{"batch": [...], "solo": [...], "probe": [...], "timings": {...}}``; each generation entry holds ``id``,
``prompt_token_ids``, ``token_ids`` (greedy, ``ignore_eos``) and ``logprobs`` (the raw log-probability of each
generated token). The batch is ONE ``LLM.generate`` call with every request; the solo runs are one call per request,
after the batch. Prefix caching is off, so a solo run recomputes the whole prompt (and the image embeddings) instead
of replaying the batch's KV cache; the multimodal processor cache keeps vLLM's default (on), so the solo runs take
its cache-hit path.

Probes need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (the probe function is pickled to the worker):

* ``probe`` entries ``{"image": {"seed": 1}, "budget": 64, "selector": "textscythe", "instruction": [34, 9]}``
  return, for the image's pixel values from the checkpoint's HF image processor, what the plugin's LLaVA model
  computes in the worker (:func:`textscythe_dev.worker_probe.probe_llava`): ``attention`` (the [CLS]
  attention the pruning reads, ``[N]``), ``features`` (stock ``embed_multimodal`` rows ``[N, D]``) and ``rows``
  (``embed_multimodal`` with the entry's pruning plan);
* ``probe_items`` is a ``torch.save``'d list of ``{"pixel_values", "grid_thw"}``: the Qwen2.5-VL model's
  ``attention`` and ``features`` for them (:func:`textscythe_dev.qwen_probe.probe_qwen2_5_vl`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ test side


@dataclass(frozen=True)
class Case:
    """One request of an equivalence test: ``prompt`` names one of the test's prompts; a case without a ``budget``
    sends no ``mm_processor_kwargs`` at all."""

    id: str
    prompt: str
    budget: int | None = None
    selector: str = "textscythe"

    @property
    def mm_processor_kwargs(self) -> dict[str, Any] | None:
        if self.budget is None:
            return None
        return {"visual_token_budget": self.budget, "visual_token_selector": self.selector}


def runner_request(case: Case, text: str, media: Sequence[Mapping[str, Any]], max_tokens: int) -> dict[str, Any]:
    """The spec's request for ``case``: the prompt ``text`` with its ``media`` in prompt order, each
    ``{"kind": "image" | "video", ...}`` (the rest as the runner reads an image or a video)."""
    def of_kind(kind: str) -> list[dict[str, Any]]:
        return [{key: value for key, value in spec.items() if key != "kind"} for spec in media if spec["kind"] == kind]

    return {"id": case.id, "prompt": text, "images": of_kind("image"), "videos": of_kind("video"),
            "mm_processor_kwargs": case.mm_processor_kwargs, "max_tokens": max_tokens}


def start_runner(
    model_dir: Path, workdir: Path, name: str, requests: list[dict[str, Any]], env: dict[str, str], *,
    probe: list[dict[str, Any]] | None = None, probe_items: str | None = None,
    llm_kwargs: dict[str, Any] | None = None, chat: list[dict[str, Any]] | None = None,
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Write ``{workdir}/{name}-spec.json`` and start the runner on it (its own process group, output in
    ``{name}.log``); returns ``(process, results path, log path)`` for :func:`finish_runner`."""
    from textscythe_dev.server import cpu_test_env

    spec = {
        "model": str(model_dir), "requests": requests, "solo": True, "probe": probe or [],
        "probe_items": probe_items or "", "llm_kwargs": llm_kwargs or {}, "chat": chat or [],
        "output": str(workdir / f"{name}-results.json"),
    }
    spec_path = workdir / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
            env=cpu_test_env(env), start_new_session=True,
        )
    return process, Path(spec["output"]), log_path


def finish_runner(process: subprocess.Popen[bytes], output: Path, log_path: Path, deadline: float) -> dict:
    """Wait for the runner until ``deadline`` (``time.monotonic()``; killed after it) and return its results;
    an ``AssertionError`` with the log's tail when it failed."""
    try:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_runner(process)
    if process.returncode != 0 or not output.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
        raise AssertionError(f"{log_path.name}: runner exited with {process.returncode}\n{tail}")
    return json.loads(output.read_text())


def stop_runner(process: subprocess.Popen[bytes]) -> None:
    """Kill a runner that is still going, with the engine processes it spawned (its process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def results_by_id(results: dict[str, Any]) -> dict[str, Any]:
    """:func:`finish_runner`'s results with the "batch" and "solo" entries keyed by request id ("probe": ``[]``
    when the run had none)."""
    return {"probe": [], **results, "batch": {entry["id"]: entry for entry in results["batch"]},
            "solo": {entry["id"]: entry for entry in results["solo"]}}


class OfflineRun:
    """One runner, started at once (:func:`start_runner`: the engine works while the test computes its
    reference) and read back by :meth:`results`; a module-scoped fixture yields it and calls :meth:`stop` after.
    ``log_selections``: the plugin records every selection it makes (``$TEXTSCYTHE_SELECTION_LOG``)."""

    def __init__(self, model_dir: Path, workdir: Path, name: str, requests: list[dict[str, Any]],
                 env: dict[str, str], *, log_selections: bool = False, **options: Any) -> None:
        self.selection_log = workdir / f"{name}-selections.jsonl" if log_selections else None
        if self.selection_log is not None:
            from textscythe_vllm.pruning import SELECTION_LOG_ENV

            env = {**env, SELECTION_LOG_ENV: str(self.selection_log)}
        self.process, self.output, self.log_path = start_runner(model_dir, workdir, name, requests, env, **options)

    def results(self, deadline: float) -> dict[str, Any]:
        """:func:`results_by_id` once the run is done (killed after ``deadline``, ``time.monotonic()``), with its
        "log" and, when logged, its "selections" (:func:`read_selection_log`)."""
        results = results_by_id(finish_runner(self.process, self.output, self.log_path, deadline))
        results["log"] = self.log_path.read_text(errors="replace")
        if self.selection_log is not None:
            results["selections"] = read_selection_log(self.selection_log)
        return results

    def stop(self) -> None:
        stop_runner(self.process)


def assert_same_generation(one: Mapping[str, Any], other: Mapping[str, Any], label: object = None) -> None:
    """Two results entries with the same prompt token ids and the same greedy tokens."""
    assert one["prompt_token_ids"] == other["prompt_token_ids"], label
    assert one["token_ids"] == other["token_ids"], label


def read_selection_log(path: Path) -> list[dict[str, Any]]:
    """The records of ``$TEXTSCYTHE_SELECTION_LOG`` (one per pruned item), ``[]`` if nothing was pruned."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------- runner side


def load_image(spec: dict[str, Any]) -> Any:
    from textscythe_dev.images import scene

    return scene(int(spec["seed"]), int(spec.get("width", 336)), int(spec.get("height", 336)))


def build_prompt(request: dict[str, Any]) -> dict[str, Any]:
    prompt: dict[str, Any] = {"prompt": request["prompt"]}
    data: dict[str, Any] = {}
    if request.get("images"):
        data["image"] = [load_image(image) for image in request["images"]]
    if request.get("videos"):
        from textscythe_dev.tiny_qwen import tiny_video

        data["video"] = [
            tiny_video(int(v["seed"]), int(v["frames"]), int(v["width"]), int(v["height"])) for v in request["videos"]
        ]
    if data:
        prompt["multi_modal_data"] = data
    if request.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = dict(request["mm_processor_kwargs"])
    return prompt


def chat_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    """``LLM.chat`` messages from a spec's ``messages``: ``{"role", "text", "images": [image specs]}`` each."""
    return [
        {"role": message["role"], "content": [
            *({"type": "image_pil", "image_pil": load_image(image)} for image in message.get("images", [])),
            {"type": "text", "text": message["text"]},
        ]}
        for message in request["messages"]
    ]


def sampled_logprobs(completion: Any) -> list[float]:
    """The raw log-probability of each generated token (``[]`` when logprobs were not requested)."""
    if completion.logprobs is None:
        return []
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]


def generation_entries(requests: list[dict[str, Any]], outputs: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "id": request["id"],
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(output.outputs[0].token_ids),
            "logprobs": sampled_logprobs(output.outputs[0]),
        }
        for request, output in zip(requests, outputs, strict=True)
    ]


def run_llava_probe(llm: Any, model_dir: str, probe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from transformers import AutoProcessor

    from textscythe_dev.worker_probe import probe_llava

    image_processor = AutoProcessor.from_pretrained(model_dir).image_processor
    items = [
        {
            "pixel_values": image_processor(images=[load_image(entry["image"])], return_tensors="pt")["pixel_values"],
            "budget": int(entry["budget"]),
            "selector": entry["selector"],
            "instruction": [int(token) for token in entry["instruction"]],
        }
        for entry in probe
    ]
    (results,) = llm.apply_model(functools.partial(probe_llava, items=items))
    return results


def run_qwen_probe(llm: Any, items_path: str) -> list[dict[str, Any]]:
    import torch

    from textscythe_dev.qwen_probe import probe_qwen2_5_vl

    (results,) = llm.apply_model(functools.partial(probe_qwen2_5_vl, items=torch.load(items_path)))
    return results


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update({key: str(value) for key, value in spec.get("env", {}).items()})

    from vllm import LLM, SamplingParams

    started = time.monotonic()
    llm_kwargs = dict(
        model=spec["model"], enforce_eager=True, max_model_len=4096, seed=0, dtype="float32",
        enable_prefix_caching=False,
    )
    llm_kwargs.update(spec.get("llm_kwargs", {}))
    llm = LLM(**llm_kwargs)
    timings = {"start_s": time.monotonic() - started}
    requests = spec["requests"]

    def params(request: dict[str, Any]) -> Any:
        return SamplingParams(
            temperature=0.0, max_tokens=int(request.get("max_tokens", 8)), ignore_eos=True, logprobs=1
        )

    results: dict[str, Any] = {}
    started = time.monotonic()
    batch = llm.generate([build_prompt(r) for r in requests], [params(r) for r in requests], use_tqdm=False)
    results["batch"] = generation_entries(requests, batch)
    timings["batch_s"] = time.monotonic() - started

    if spec.get("solo", True):
        started = time.monotonic()
        solo = [llm.generate([build_prompt(r)], [params(r)], use_tqdm=False)[0] for r in requests]
        results["solo"] = generation_entries(requests, solo)
        timings["solo_s"] = time.monotonic() - started

    if spec.get("chat"):  # LLM.chat, one conversation at a time, with the request's mm_processor_kwargs
        started = time.monotonic()
        chats = spec["chat"]
        outputs = [llm.chat(chat_messages(c), params(c), use_tqdm=False,
                            mm_processor_kwargs=c.get("mm_processor_kwargs"))[0] for c in chats]
        results["chat"] = generation_entries(chats, outputs)
        timings["chat_s"] = time.monotonic() - started

    if spec.get("probe") or spec.get("probe_items"):
        started = time.monotonic()
        results["probe"] = (
            run_llava_probe(llm, spec["model"], spec["probe"]) if spec.get("probe")
            else run_qwen_probe(llm, spec["probe_items"])
        )
        timings["probe_s"] = time.monotonic() - started

    results["timings"] = timings
    Path(spec["output"]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m textscythe_dev.offline SPEC.json")
    raise SystemExit(main(sys.argv[1]))
