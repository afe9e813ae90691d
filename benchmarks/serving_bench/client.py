"""The measuring side: build the depth-cut checkpoint, start ``vllm serve`` with the plugin, send the requests
(single-stream rounds and concurrency bursts), time them on the client, scrape vLLM's and the plugin's metrics
around each, and time the probe and the tower in process once the server is stopped.

:func:`run` returns the raw report (``config``, ``environment``, ``in_process``, ``requests``, ``concurrency``);
:func:`serving_bench.analysis.summarise` adds the analysis.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from textscythe_dev.load import Sample, metric_samples, metric_sum

from .analysis import NO_BUDGET, Outcome, percentile
from .flops import SHAPES, Served, expected_visual_tokens, family, is_qwen, scaling, served_configs

Samples = list[Sample]  # one /metrics scrape: (sample name, labels, value)

# LLaVA-style question; every word is in the tiny tokenizer's vocabulary (T = 36 text tokens with LLaVA's template,
# 38 with Qwen's: ChatML plus <|vision_start|> / <|vision_end|> around the image).
QUESTION = ("Please look at the picture and describe in detail what the man on the left side of the street is "
            "holding in his hand, and what colour it is.")


# ------------------------------------------------------------------------------------------ the model
def make_image(seed: int, size: int):
    """A distinct picture per request: a smooth scene with blobs plus per-pixel noise, as a PIL image."""
    import numpy as np
    from PIL import Image

    from textscythe_dev.images import scene

    base = np.asarray(scene(seed, size, size), dtype=np.int16)
    noise = np.random.default_rng(seed + 1_000_003).integers(-24, 25, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def jpeg_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def count_placeholders(model_dir: Path, size: int) -> tuple[int, int]:
    """(N, views) for one ``size`` x ``size`` image, from the checkpoint's own HF processor (vLLM's count is
    checked against it; the server's ``usage.prompt_tokens`` confirms it again). Qwen3-VL: one view, N the
    ``<|image_pad|>`` tokens the image expands to."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = make_image(0, size)
    if "image_grid_thw" in processor.image_processor.model_input_names:  # Qwen3-VL
        from textscythe_dev.tiny_qwen import IMAGE_PAD, VISION_END, VISION_START

        out = processor(images=[image], text=VISION_START + IMAGE_PAD + VISION_END, return_tensors="pt")
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        return int((out["input_ids"] == image_id).sum()), int(out["image_grid_thw"].shape[0])
    out = processor(images=[image], text="<image>", return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    num_visual = int((out["input_ids"] == image_id).sum())
    pixels = out["pixel_values"]
    views = int(pixels.shape[1]) if pixels.dim() == 5 else int(pixels.shape[0])
    return num_visual, views


def shape_tokenizer(shape: str):
    """The served checkpoint's tokenizer: the tiny word-level one with LLaVA's or Qwen's (ChatML) template."""
    if is_qwen(shape):
        from textscythe_dev.tiny_qwen3_vl import build_tiny_qwen3_vl_tokenizer

        return build_tiny_qwen3_vl_tokenizer()
    from textscythe_dev.tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer()


def build_qwen_model(args: argparse.Namespace, directory: Path, text_tokens: int) -> Served:
    """The Qwen3-VL-8B-shaped checkpoint (``--quick``: tiny widths), with DeepStack; every ViT block runs."""
    from textscythe_dev import qwen3_vl_8b_shape as qwen3

    image_px = SHAPES[args.shape]["image_px"]
    if args.quick:
        model_dir = qwen3.build_tiny_shaped(directory, args.llm_layers)
    else:
        text_cfg, vision_cfg, args.vision_layers = served_configs(args.shape, args.llm_layers, args.vision_layers,
                                                                  text_tokens)
        model_dir = qwen3.build_checkpoint(directory, text_cfg, vision_cfg)
    config = json.loads((model_dir / "config.json").read_text())
    text, vision = config["text_config"], {**config["vision_config"], "image_size": image_px}
    num_visual, views = count_placeholders(model_dir, image_px)
    expected = expected_visual_tokens(args.shape)
    if (num_visual, views) != expected:
        raise RuntimeError(f"expected {expected[0]} tokens in {expected[1]} view(s), got {num_visual} in {views}")
    served = Served(model_dir, text, vision, vision["depth"], views, num_visual, text_tokens, shape=args.shape)
    served.scaling = scaling(served)
    return served


def build_model(args: argparse.Namespace, directory: Path) -> Served:
    from textscythe_dev.tiny_models import build_tiny_llava

    shape = SHAPES[args.shape]
    text_tokens = len(image_prompt_ids(shape_tokenizer(args.shape))) - 1
    if is_qwen(args.shape):
        return build_qwen_model(args, directory, text_tokens)
    if args.quick:  # the test suite's tiny widths: a smoke run, not a measurement
        text_cfg, vision_cfg = {"num_hidden_layers": args.llm_layers}, None
        num_visual_guess, views_guess = None, None
    else:
        num_visual_guess, views_guess = expected_visual_tokens(args.shape)
        text_cfg, vision_cfg, args.vision_layers = served_configs(args.shape, args.llm_layers, args.vision_layers,
                                                                  text_tokens)
    model_dir = build_tiny_llava(directory, kind=shape["kind"], dtype="float32",
                                 text_config=text_cfg, vision_config=vision_cfg)
    config = json.loads((model_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    text.setdefault("num_key_value_heads", text["num_attention_heads"])
    vision_layers = vision["num_hidden_layers"] + config.get("vision_feature_layer", -1) + 1
    num_visual, views = count_placeholders(model_dir, shape["image_px"])
    if num_visual_guess is not None and (num_visual, views) != (num_visual_guess, views_guess):
        raise RuntimeError(f"expected {num_visual_guess} tokens in {views_guess} views, got {num_visual} in {views}")
    served = Served(model_dir, text, vision, vision_layers, views, num_visual, text_tokens)
    served.scaling = scaling(served)
    return served


# ------------------------------------------------------------------------------------------ prompts
def image_prompt_ids(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


class TextPrompts:
    """Text-only prompts of an exact token count: random vocabulary words before the same question."""

    def __init__(self, tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_tokens)
        self.words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w not in special
                            and len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1)
        self.rng = random.Random(seed)
        self.base = self.count(QUESTION)

    def count(self, content: str) -> int:
        messages = [{"role": "user", "content": content}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def make(self, tokens: int) -> str:
        filler = " ".join(self.rng.choice(self.words) for _ in range(tokens - self.base))
        content = f"{filler} {QUESTION}" if filler else QUESTION
        if self.count(content) != tokens:
            raise RuntimeError(f"text prompt has {self.count(content)} tokens, wanted {tokens}")
        return content


@dataclass
class Spec:
    """One request type: an image with a budget (None: unpruned), the same image request pruned by the near-free
    control selector, or a text-only prompt of ``tokens`` tokens."""

    kind: str  # "image" | "control" | "text"
    budget: int | None
    tokens: int  # expected usage.prompt_tokens

    @property
    def label(self) -> str:
        return f"{self.kind}@{NO_BUDGET if self.budget is None else self.budget}"

    @property
    def has_image(self) -> bool:
        return self.kind != "text"


class Requests:
    """Request bodies, each with its own image (distinct seed) or its own filler words."""

    def __init__(self, served: Served, model_name: str, args: argparse.Namespace, tokenizer) -> None:
        self.served, self.model_name, self.args = served, model_name, args
        self.size = SHAPES[args.shape]["image_px"]
        self.text = TextPrompts(tokenizer, args.seed)
        self.next_image = args.seed * 100_000 + 1

    def selector(self, spec: Spec) -> str:
        """The ``visual_token_selector`` of a request type (its metric label too)."""
        return self.args.control_selector if spec.kind == "control" else self.args.selector

    def body(self, spec: Spec) -> dict[str, Any]:
        if spec.has_image:
            self.next_image += 1
            url = jpeg_data_url(make_image(self.next_image, self.size))
            content: Any = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
        else:
            content = self.text.make(spec.tokens)
        body: dict[str, Any] = {
            "model": self.model_name, "messages": [{"role": "user", "content": content}],
            "max_tokens": self.args.max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if spec.has_image and spec.budget is not None:
            body["visual_token_budget"] = spec.budget
            body["visual_token_selector"] = self.selector(spec)
        return body


# ------------------------------------------------------------------------------------------ the client
async def stream_request(client, url: str, body: dict[str, Any], spec: Spec) -> Outcome:
    outcome = Outcome(spec.label, spec.budget, spec.kind, spec.tokens)
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - started  # the role chunk: sent with the first token
                if chunk.get("usage"):
                    outcome.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    outcome.completion_tokens = chunk["usage"]["completion_tokens"]
                if "error" in chunk:
                    outcome.error = str(chunk["error"])[:300]
        outcome.e2e_s = time.perf_counter() - started
    except Exception as exc:  # reported, counted, never fatal
        outcome.error = f"{type(exc).__name__}: {exc}"
    if outcome.error is None and outcome.prompt_tokens != spec.tokens:
        outcome.error = f"prompt_tokens {outcome.prompt_tokens}, expected {spec.tokens}"
    return outcome


async def scrape(client, base_url: str) -> Samples:
    """``/metrics``, parsed once (:func:`textscythe_dev.load.metric_samples`: ``prometheus_client.parser``);
    :func:`~textscythe_dev.load.metric_sum` reads it."""
    return metric_samples((await client.get(f"{base_url}/metrics")).text)


PREFILL = "vllm:request_prefill_time_seconds"
QUEUE = "vllm:request_queue_time_seconds"
DECODE = "vllm:request_decode_time_seconds"
SELECTOR_LATENCY = "textscythe_selector_latency_seconds"


async def settled(client, base_url: str, before: Samples, finished: int, timeout: float = 30.0) -> Samples:
    """Scrape until vLLM has recorded ``finished`` more finished requests than in ``before``."""
    deadline = time.monotonic() + timeout
    while True:
        after = await scrape(client, base_url)
        done = metric_sum(after, PREFILL + "_count") - metric_sum(before, PREFILL + "_count")
        if done >= finished or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.05)


def deltas(before: Samples, after: Samples, selector: str) -> dict[str, float]:
    return {
        "prefill_s": metric_sum(after, PREFILL + "_sum") - metric_sum(before, PREFILL + "_sum"),
        "queue_s": metric_sum(after, QUEUE + "_sum") - metric_sum(before, QUEUE + "_sum"),
        "decode_s": metric_sum(after, DECODE + "_sum") - metric_sum(before, DECODE + "_sum"),
        "selector_s": (metric_sum(after, SELECTOR_LATENCY + "_sum", selector=selector)
                       - metric_sum(before, SELECTOR_LATENCY + "_sum", selector=selector)),
        "selections": (metric_sum(after, SELECTOR_LATENCY + "_count", selector=selector)
                       - metric_sum(before, SELECTOR_LATENCY + "_count", selector=selector)),
        "finished": metric_sum(after, PREFILL + "_count") - metric_sum(before, PREFILL + "_count"),
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def single_stream(args: argparse.Namespace, base_url: str, requests: Requests, specs: list[Spec]) -> list[Outcome]:
    """``--warmup`` + ``--rounds`` rounds; each sends every spec once, alone: the budgets in a fresh shuffled
    order, and for each budget its image request and its equal-length text-only request back to back (in a random
    order), so the differences the analysis takes are between neighbours in time."""
    import httpx

    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    url = f"{base_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as client:
        for round_index in range(args.warmup + args.rounds):
            budgets = list(dict.fromkeys(spec.budget for spec in specs))
            rng.shuffle(budgets)
            order = []
            for budget in budgets:
                pair = [spec for spec in specs if spec.budget == budget]
                rng.shuffle(pair)
                order += pair
            timed = round_index >= args.warmup
            for spec in order:
                body = requests.body(spec)  # the image is encoded before the clock starts
                before = await scrape(client, base_url)
                outcome = await stream_request(client, url, body, spec)
                after = await settled(client, base_url, before, 1)
                delta = deltas(before, after, requests.selector(spec))
                outcome.prefill_s, outcome.queue_s, outcome.decode_s = (delta["prefill_s"], delta["queue_s"],
                                                                        delta["decode_s"])
                outcome.selector_s = delta["selector_s"] if spec.has_image else None
                outcome.round = round_index - args.warmup if timed else None
                if timed:
                    outcomes.append(outcome)
                log(f"  round {round_index + 1}/{args.warmup + args.rounds}{'' if timed else ' (warm-up)'} "
                    f"{spec.label:>12}: TTFT {fmt_s(outcome.ttft_s)}, prefill {fmt_s(outcome.prefill_s)}, "
                    f"e2e {fmt_s(outcome.e2e_s)}, prompt {outcome.prompt_tokens}"
                    + (f" ERROR {outcome.error}" if outcome.error else ""))
    return outcomes


async def burst(args: argparse.Namespace, base_url: str, requests: Requests, specs: list[Spec],
                concurrency: int) -> dict[str, Any]:
    """Send ``specs`` with at most ``concurrency`` in flight; throughput and latency percentiles."""
    import httpx

    bodies = [requests.body(spec) for spec in specs]
    url = f"{base_url}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        before = await scrape(client, base_url)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(specs)):
            queue.put_nowait(index)
        outcomes: list[Outcome | None] = [None] * len(specs)

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                outcomes[index] = await stream_request(client, url, bodies[index], specs[index])

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        after = await settled(client, base_url, before, len(specs))
    done = [o for o in outcomes if o is not None]
    good = [o for o in done if o.error is None]
    delta = deltas(before, after, args.selector)
    ttft = [o.ttft_s for o in good if o.ttft_s is not None]
    e2e = [o.e2e_s for o in good if o.e2e_s is not None]
    return {
        "requests": len(specs), "errors": len(done) - len(good),
        "error_examples": [o.error for o in done if o.error][:3],
        "budgets": sorted({NO_BUDGET if s.budget is None else s.budget for s in specs}, key=str),
        "prompt_tokens": [o.prompt_tokens for o in done], "expected_prompt_tokens": [s.tokens for s in specs],
        "wall_s": wall, "requests_per_s": len(good) / wall,
        "output_tokens_per_s": sum(o.completion_tokens or 0 for o in good) / wall,
        "prompt_tokens_per_s": sum(o.prompt_tokens or 0 for o in good) / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p95_s": percentile(e2e, 95),
        "mean_prefill_s": delta["prefill_s"] / max(delta["finished"], 1),
        "mean_queue_s": delta["queue_s"] / max(delta["finished"], 1),
        "selector_s_per_image": delta["selector_s"] / delta["selections"] if delta["selections"] else None,
        "ttft_s": [o.ttft_s for o in done], "e2e_s": [o.e2e_s for o in done],
        "loadavg_1min": [load_before, load_after],
    }


def fmt_s(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}s"


# ------------------------------------------------------------------------------ in-process measurements
def time_in_process(served: Served, repeats: int = 5) -> dict[str, Any]:
    """With the server stopped: the plugin's [CLS]-attention probe on the tower's q/k/v shape (fastest of 25),
    and the same tower (transformers' CLIP, ``vision_layers`` layers) + projector, float32 (median of
    ``repeats``), each at 1 thread and at the machine's thread count (the worker's). The probe is the
    attention-extraction estimate (the fastest of both: on a loaded machine a 2-thread sub-millisecond op mostly
    waits for its second thread); the tower is a cross-check of the vision-encoder estimate from the server.
    Qwen3-VL: the mean-received-attention probe (:class:`~textscythe_vllm.probes.RotaryAttentionProbe`) on the
    last block's rotated q/k, and transformers' Qwen3-VL ViT with its mergers (DeepStack included), fewer repeats
    (one image is ~1 TFLOP at the real width)."""
    import torch

    threads = sorted({1, os.cpu_count() or 1})
    by_threads = {}
    measure = _time_qwen_in_process if is_qwen(served.shape) else _time_in_process
    for count in threads:
        torch.set_num_threads(count)
        by_threads[str(count)] = measure(served, min(repeats, 2) if is_qwen(served.shape) else repeats)
    probes = [r["attention_probe_s"] for r in by_threads.values() if r.get("attention_probe_s") is not None]
    return {
        "views": served.views, "by_threads": by_threads,
        "attention_probe_s": min(probes) if probes else None,
        "vision_tower_projector_s": min(r["vision_tower_projector_s"] for r in by_threads.values()),
        "vision_flops": sum(served.family.vision_flops(served.views, served.vision, served.vision_layers,
                                                       served.text["hidden_size"]).values()),
    }


def _time_in_process(served: Served, repeats: int) -> dict[str, Any]:
    from types import SimpleNamespace

    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = served.vision
    c, heads = vision["hidden_size"], vision["num_attention_heads"]
    seq = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        try:
            from textscythe_vllm.probes import ClsAttentionProbe

            attention = SimpleNamespace(num_heads_per_partition=heads, num_heads=heads, head_dim=c // heads,
                                        scale=(c // heads) ** -0.5, tp_size=1)
            probe = SimpleNamespace(_attention=attention)
            scores = ClsAttentionProbe.scores
            qkv = torch.randn(served.views, seq, 3 * c, generator=generator)
            times = []
            for _ in range(3 + 5 * repeats):
                started = time.perf_counter()
                scores(probe, qkv)
                times.append(time.perf_counter() - started)
            result["attention_probe_s"] = min(times[3:])
            result["attention_probe_median_s"] = statistics.median(times[3:])
        except Exception as exc:  # the probe belongs to the plugin: report, do not fail
            result["attention_probe_s"] = None
            result["attention_probe_error"] = f"{type(exc).__name__}: {exc}"
        config = CLIPVisionConfig(**{k: vision[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                             "image_size", "patch_size")},
                                  num_hidden_layers=served.vision_layers)
        tower = CLIPVisionModel(config).eval()
        hidden = served.text["hidden_size"]
        projector = torch.nn.Sequential(torch.nn.Linear(c, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, hidden)).eval()
        pixels = torch.randn(served.views, 3, vision["image_size"], vision["image_size"], generator=generator)
        times = []
        for _ in range(1 + repeats):
            started = time.perf_counter()
            features = tower(pixel_values=pixels).last_hidden_state[:, 1:]
            projector(features.reshape(-1, c))
            times.append(time.perf_counter() - started)
        result["vision_tower_projector_s"] = statistics.median(times[1:])
    return result


def _time_qwen_in_process(served: Served, repeats: int) -> dict[str, Any]:
    from types import SimpleNamespace

    import torch
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    vision = served.vision
    c, heads = vision["hidden_size"], vision["num_heads"]
    merge, patch, temporal = vision["spatial_merge_size"], vision["patch_size"], vision["temporal_patch_size"]
    side = vision["image_size"] // patch
    seq = side * side
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        try:
            from textscythe_vllm.probes import RotaryAttentionProbe

            probe = SimpleNamespace(local_heads=heads, head_dim=c // heads, tp_size=1, scale=(c // heads) ** -0.5,
                                    _segments=[seq])
            rotated = torch.randn(2, seq, heads, c // heads, generator=generator)
            times = []
            for _ in range(1 + 2 * repeats):
                started = time.perf_counter()
                RotaryAttentionProbe.scores(probe, rotated).reshape(-1, merge * merge).mean(dim=1)
                times.append(time.perf_counter() - started)
            result["attention_probe_s"] = min(times[1:])
            result["attention_probe_median_s"] = statistics.median(times[1:])
        except Exception as exc:  # the probe belongs to the plugin: report, do not fail
            result["attention_probe_s"] = None
            result["attention_probe_error"] = f"{type(exc).__name__}: {exc}"
        fields = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                  "spatial_merge_size", "temporal_patch_size", "deepstack_visual_indexes", "num_position_embeddings")
        config = Qwen3VLVisionConfig(**{k: vision[k] for k in fields}, hidden_act="gelu_pytorch_tanh")
        config._attn_implementation = "sdpa"
        tower = Qwen3VLVisionModel(config).eval()
        pixels = torch.randn(seq, 3 * temporal * patch * patch, generator=generator)
        grid = torch.tensor([[1, side, side]])
        times = []
        for _ in range(1 + repeats):
            started = time.perf_counter()
            tower(hidden_states=pixels, grid_thw=grid)
            times.append(time.perf_counter() - started)
        result["vision_tower_projector_s"] = statistics.median(times[1:])
    return result


# ------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, serve it, measure; the raw report (no analysis: :func:`~serving_bench.analysis.summarise`)."""
    from textscythe_dev.server import VLLMServer

    started = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="textscythe-serving-") as scratch:
        served = build_model(args, Path(scratch) / "model")
        log(f"model: {args.shape}-shaped, LLM {served.text['num_hidden_layers']} x {served.text['hidden_size']}, "
            f"{served.family.tower} {served.vision_layers} x {served.vision['hidden_size']}, N={served.num_visual} in "
            f"{served.views} view(s), T={served.text_tokens}; vision/LLM FLOPs "
            f"{served.scaling['ratio_mismatch']:.2f} x the real ratio")
        tokenizer = shape_tokenizer(args.shape)
        n, t = served.num_visual, served.text_tokens
        specs = [Spec("image", None, t + n), *(Spec("image", k, t + min(k, n)) for k in args.budgets),
                 Spec("text", None, t + n), *(Spec("text", k, t + min(k, n)) for k in args.budgets)]
        if args.control_selector:
            specs += [Spec("control", k, t + min(k, n)) for k in args.budgets]
        server_args = ["--load-format", "dummy", "--dtype", "float32", "--seed", str(args.seed),
                       "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]
        log_path = args.server_log or Path(scratch) / "vllm.log"
        server = VLLMServer(served.model_dir, server_args, log_path=log_path, env={"VLLM_CPU_KVCACHE_SPACE": "2"},
                            served_model_name="qwen3-vl-shaped" if is_qwen(args.shape) else "llava-shaped")
        server_started = time.perf_counter()
        with server:
            startup_s = time.perf_counter() - server_started
            log(f"server up in {startup_s:.0f} s at {server.base_url}")
            requests = Requests(served, server.model_name, args, tokenizer)
            outcomes = asyncio.run(single_stream(args, server.base_url, requests, specs))
            levels = []
            for index, concurrency in enumerate(args.concurrency):
                count = args.requests or max(6, 2 * concurrency)
                pruned_specs = [Spec("image", k, t + min(k, n)) for k in
                                (args.budgets[i % len(args.budgets)] for i in range(count))]
                unpruned_specs = [Spec("image", None, t + n) for _ in range(count)]
                order = ["pruned", "unpruned"] if index % 2 == 0 else ["unpruned", "pruned"]
                level: dict[str, Any] = {"concurrency": concurrency, "order": order}
                for mode in order:
                    level[mode] = asyncio.run(burst(args, server.base_url, requests,
                                                    pruned_specs if mode == "pruned" else unpruned_specs, concurrency))
                    log(f"  concurrency {concurrency} {mode}: {level[mode]['requests_per_s']:.3f} req/s, TTFT p50 "
                        f"{fmt_s(level[mode]['ttft_p50_s'])} p95 {fmt_s(level[mode]['ttft_p95_s'])}, "
                        f"errors {level[mode]['errors']}")
                levels.append(level)
            server_alive = server.alive()
            if not server_alive:
                log(server.log_tail())
    in_process = time_in_process(served)
    load_end = os.getloadavg()
    errors = [o for o in outcomes if o.error]
    import torch
    import vllm

    fam = family(args.shape)
    report = {
        "config": {
            "shape": args.shape, "real_model": SHAPES[args.shape]["real"], "quick": args.quick,
            "budgets": args.budgets, "selector": args.selector, "control_selector": args.control_selector,
            "rounds": args.rounds, "warmup": args.warmup,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "seed": args.seed,
            "image_px": SHAPES[args.shape]["image_px"], "views": served.views,
            "visual_tokens_N": served.num_visual, "text_tokens_T": served.text_tokens, "question": QUESTION,
            "served_text_config": {k: served.text.get(k) for k in fam.real_text},
            "served_vision_config": {**{k: served.vision.get(k) for k in fam.real_vision},
                                     "layers_run": served.vision_layers},
            "real_text_config": fam.real_text,
            "real_vision_config": {**fam.real_vision, "layers_run": fam.real_vision_layers},
            "scaling": served.scaling, "dtype": "float32",
            "server_args": server_args, "server_env": {"VLLM_CPU_KVCACHE_SPACE": "2"},
        },
        "environment": {
            "vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": load_end,
            "server_startup_s": startup_s, "server_alive_at_end": server_alive,
            "total_seconds": time.perf_counter() - started,
        },
        "in_process": in_process,
        "requests": [asdict(o) for o in outcomes],
        "errors": len(errors), "error_examples": [o.error for o in errors[:5]],
        "concurrency": levels,
    }
    return report


