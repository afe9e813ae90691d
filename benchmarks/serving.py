"""End-to-end serving benchmark: what does a visual-token budget buy on a real ``vllm serve`` with the plugin?

The model is LLaVA-1.5-7B-shaped (``--shape llava-1.5``: Vicuna-7B's width -- hidden 4096, 32 heads of 128,
MLP 11008 -- behind a CLIP ViT-L/14-336 tower: hidden 1024, 16 heads, MLP 4096, 576 visual tokens) or
LLaVA-NeXT-7B-shaped (``--shape llava-next``: the same LLM and tower, any-resolution tiling; a 672 x 672 image
is 5 views, 2,880 visual tokens plus 48 newline rows = 2,928), with random weights (``--load-format dummy``)
and **fewer layers**: ``--llm-layers`` of the 32 LLM layers and ``--vision-layers`` of the 23 tower layers
vLLM runs (LLaVA's feature layer is the penultimate). Unless given, the vision layers are chosen so that the
served model keeps the real model's ratio of vision-side FLOPs (tower + projector) to LLM-prefill FLOPs at
the full visual-token count; the residual mismatch is in the report (``config.scaling``). Width, token
counts and image sizes are the real ones, so every GEMM has the real shape and only the depth is cut.

Served with ``vllm serve --load-format dummy --dtype float32 --no-enable-prefix-caching
--mm-processor-cache-gb 0 --enforce-eager`` plus the plugin's middleware (``VLLMServer``), one server at a
time; every request has its own image (a distinct random JPEG), so no cache can serve a repeat.

Measured, in interleaved rounds (each round sends every request type once, in a shuffled order; medians over
rounds; a warm-up round first):

* per budget (``none`` and every ``--budgets`` K): TTFT (client side: the first streamed chunk, which vLLM
  sends when the first token exists), vLLM's prefill time (``vllm:request_prefill_time_seconds``: scheduled ->
  first token, so vision encoder + selection + LLM prefill), end-to-end latency (``--max-tokens`` tokens,
  ``ignore_eos``) and the plugin's worker-side selector time (``textscythe_selector_latency_seconds``,
  [CLS]-attention probing included);
* text-only prompts of exactly T + N and T + K tokens (T: the image request's text tokens; checked against
  ``usage.prompt_tokens``), the LLM-only part of each request;
* two ideals for TTFT(K): **(a)** TTFT(none) x FLOPs(K) / FLOPs(none) from an analytic FLOP model of the
  served configuration (GEMMs + attention of tower, projector and LLM prefill), and **(b)** the measured bound
  TTFT(none) - (TTFT_text(T + N) - TTFT_text(T + K)): the LLM time that pruning can at best remove, measured
  on the same server in the same round. Goal: TTFT(K) <= 1.1 x (b) for every K;
* the components of TTFT and of the gap TTFT(K) - (b): fixed request overhead (TTFT - prefill time), vision
  encoder (prefill(image, none) - prefill(text, T + N)), attention extraction (the plugin's probe timed in
  this process on the tower's real shapes), selector (worker metric - probe), LLM prefill (prefill(text,
  T + K)) and the residual of the image request's prefill;
* concurrency ``--concurrency`` (default 1 4 16; LLaVA-NeXT: 4): the same burst of requests with mixed
  budgets (cycling through ``--budgets``) and without budgets, side by side: throughput, TTFT and latency
  p50 / p95. Pruning must never be slower.

    python benchmarks/serving.py                          # LLaVA-1.5-shaped, ~13-20 min on 2 cores
    python benchmarks/serving.py --shape llava-next       # 2,928 visual tokens -> 320, ~19-23 min
    python benchmarks/serving.py --quick                  # smoke run: tiny widths, ~1.5-3 min
    python benchmarks/serving.py --reanalyse benchmarks/results/serving.json --out /tmp/s.json  # no server

Writes JSON (``--out``, default benchmarks/results/serving.json, ``serving_next.json`` for LLaVA-NeXT), the
Markdown tables next to it (``.md``) and a plot (``.png``); prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:  # the shared report writer, also when this file is loaded by path
    sys.path.insert(0, str(BENCHMARKS_DIR))

from _report import REPO_ROOT, pyplot, save_figure, show, write_report  # noqa: E402

from textscythe_dev.llava_7b_shape import (  # noqa: E402
    REAL_TEXT,
    REAL_VISION,
    derive_vision_layers,
    request_flops,
    seven_b_configs,
    vision_flops,
    vision_llm_ratio,
)

RESULTS = REPO_ROOT / "benchmarks" / "results"
NO_BUDGET = "none"
GOAL_FRACTION = 0.10  # TTFT(K) within 10% of bound (b)
SELECTOR = "textscythe"
#: The control requests' selector: evenly spaced rows, no text, no attention -- pruning at (almost) no cost.
CONTROL_SELECTOR = "uniform"
# LLaVA-style question; every word is in the tiny tokenizer's vocabulary (T = 37 text tokens with the template).
QUESTION = ("Please look at the picture and describe in detail what the man on the left side of the street is "
            "holding in his hand, and what colour it is.")

SHAPES: dict[str, dict[str, Any]] = {
    "llava-1.5": {"kind": "llava-1.5", "real": "LLaVA-1.5-7B", "image_px": 336, "budgets": [192, 128, 64],
                  "concurrency": [1, 4, 16], "rounds": 12, "out": "serving.json"},
    "llava-next": {"kind": "llava-next", "real": "LLaVA-NeXT-7B (v1.6, Vicuna-7B)", "image_px": 672,
                   "budgets": [320], "concurrency": [4], "rounds": 9, "out": "serving_next.json"},
}
DEFAULT_LLM_LAYERS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5")
    parser.add_argument("--llm-layers", type=int, default=None,
                        help=f"LLM layers served (of 32; default {DEFAULT_LLM_LAYERS}; --quick: 2 of a tiny LLM)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="CLIP layers run (of 23; default: the count that keeps the real vision/LLM FLOP ratio)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="budgets K (default 192 128 64; llava-next 320)")
    parser.add_argument("--rounds", type=int, default=None, help="timed single-stream rounds (default 12; llava-next 9)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=None,
                        help="concurrency levels (default 1 4 16; llava-next 4); each runs pruned and unpruned")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per concurrency level and mode (default max(6, 2 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 8)")
    parser.add_argument("--selector", default=SELECTOR, help=f"visual_token_selector (default {SELECTOR})")
    parser.add_argument("--control-selector", default=CONTROL_SELECTOR,
                        help="near-free selector of the control requests (same image pruned to the same K; default "
                             f"{CONTROL_SELECTOR}); '' for none")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny widths, budgets none/64, 2 rounds, concurrency 1 4 with 4 requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/serving*.json)")
    parser.add_argument("--server-log", type=Path, default=None, help="vllm serve's log (default: a temp file)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--reanalyse", type=Path, default=None, metavar="JSON",
                        help="no server: rebuild the analysis, tables and plot from a saved report's measurements")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.quick:
        args.budgets = args.budgets or [64]
        args.rounds = args.rounds or 2
        args.concurrency = [1, 4] if args.concurrency is None else args.concurrency
        args.requests = args.requests or 4
        args.max_tokens = args.max_tokens or 4
        args.llm_layers = args.llm_layers or 2
    args.budgets = args.budgets or list(shape["budgets"])
    args.rounds = args.rounds or shape["rounds"]
    args.concurrency = list(shape["concurrency"]) if args.concurrency is None else args.concurrency
    args.max_tokens = args.max_tokens or 8
    args.llm_layers = args.llm_layers or DEFAULT_LLM_LAYERS
    args.out = args.out or RESULTS / shape["out"]
    if min(args.budgets) < 1 or len(set(args.budgets)) != len(args.budgets):
        parser.error("--budgets must be distinct and >= 1")
    if args.rounds < 1 or args.warmup < 0 or args.max_tokens < 1 or args.llm_layers < 1:
        parser.error("--rounds, --max-tokens, --llm-layers must be >= 1 and --warmup >= 0")
    if any(c < 1 for c in args.concurrency) or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be >= 1")
    if args.vision_layers is not None and not 1 <= args.vision_layers <= 23:
        parser.error("--vision-layers must be in 1..23")
    from textscythe_vllm.selectors import available_selectors

    if args.control_selector and args.control_selector not in available_selectors():
        parser.error(f"--control-selector must be one of {available_selectors()} or ''")
    if args.control_selector == args.selector:
        parser.error("--control-selector must differ from --selector")
    return args


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Served:
    """What is served: the checkpoint directory and the numbers the analysis needs."""

    model_dir: Path
    text: dict[str, Any]
    vision: dict[str, Any]
    vision_layers: int
    views: int
    num_visual: int  # placeholder tokens of one unpruned image (N)
    text_tokens: int  # the image request's non-image prompt tokens (T)
    scaling: dict[str, Any] = field(default_factory=dict)


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
    checked against it; the server's ``usage.prompt_tokens`` confirms it again)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = make_image(0, size)
    out = processor(images=[image], text="<image>", return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    num_visual = int((out["input_ids"] == image_id).sum())
    pixels = out["pixel_values"]
    views = int(pixels.shape[1]) if pixels.dim() == 5 else int(pixels.shape[0])
    return num_visual, views


def build_model(args: argparse.Namespace, directory: Path) -> Served:
    from textscythe_dev.tiny_models import build_tiny_llava, build_tiny_tokenizer

    shape = SHAPES[args.shape]
    text_tokens = len(image_prompt_ids(build_tiny_tokenizer())) - 1
    if args.quick:  # the test suite's tiny widths: a smoke run, not a measurement
        text_cfg, vision_cfg = {"num_hidden_layers": args.llm_layers}, None
        num_visual_guess, views_guess = None, None
    else:
        views_guess = 1 if shape["kind"] == "llava-1.5" else 5
        num_visual_guess = 576 if views_guess == 1 else 2928
        if args.vision_layers is None:
            args.vision_layers = derive_vision_layers(args.llm_layers, text_tokens, num_visual_guess, views_guess)
        text_cfg, vision_cfg = seven_b_configs(args.llm_layers, args.vision_layers)
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
    real = vision_llm_ratio(text_tokens, num_visual, views, REAL_TEXT, REAL_VISION, 23)
    ratio = vision_llm_ratio(text_tokens, num_visual, views, text, vision, vision_layers)
    served.scaling = {
        "llm_layers": text["num_hidden_layers"], "llm_layers_real": REAL_TEXT["num_hidden_layers"],
        "vision_layers_run": vision_layers, "vision_layers_run_real": 23,
        "vision_to_llm_flops_real": real, "vision_to_llm_flops_served": ratio,
        "ratio_mismatch": ratio / real,  # 1 = the real model's balance; > 1: vision weighs more than in the real model
        "note": "vision side = CLIP tower + projector; LLM = prefill of T + N tokens; width, token counts, image "
                "sizes and the vocabulary-independent parts are the real model's, only depth is cut",
    }
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
@dataclass
class Outcome:
    label: str
    budget: int | None
    kind: str
    expected_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    # single-stream only: per-request deltas of the server's metrics
    prefill_s: float | None = None
    queue_s: float | None = None
    decode_s: float | None = None
    selector_s: float | None = None
    round: int | None = None


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




async def scrape(client, base_url: str) -> dict[tuple[str, frozenset], float]:
    """``/metrics`` as {(sample name, labels): value}, parsed by ``prometheus_client.parser`` (histogram
    buckets left out: only sums and counts are needed)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(f"{base_url}/metrics")).text
    return {(sample.name, frozenset(sample.labels.items())): float(sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples
            if "le" not in sample.labels}


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return sum(value for (sample, have), value in samples.items()
               if sample == name and all((k, v) in have for k, v in labels.items()))


PREFILL = "vllm:request_prefill_time_seconds"
QUEUE = "vllm:request_queue_time_seconds"
DECODE = "vllm:request_decode_time_seconds"
SELECTOR_LATENCY = "textscythe_selector_latency_seconds"


async def settled(client, base_url: str, before: dict, finished: int, timeout: float = 30.0) -> dict:
    """Scrape until vLLM has recorded ``finished`` more finished requests than in ``before``."""
    deadline = time.monotonic() + timeout
    while True:
        after = await scrape(client, base_url)
        done = metric(after, PREFILL + "_count") - metric(before, PREFILL + "_count")
        if done >= finished or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.05)


def deltas(before: dict, after: dict, selector: str) -> dict[str, float]:
    return {
        "prefill_s": metric(after, PREFILL + "_sum") - metric(before, PREFILL + "_sum"),
        "queue_s": metric(after, QUEUE + "_sum") - metric(before, QUEUE + "_sum"),
        "decode_s": metric(after, DECODE + "_sum") - metric(before, DECODE + "_sum"),
        "selector_s": (metric(after, SELECTOR_LATENCY + "_sum", selector=selector)
                       - metric(before, SELECTOR_LATENCY + "_sum", selector=selector)),
        "selections": (metric(after, SELECTOR_LATENCY + "_count", selector=selector)
                       - metric(before, SELECTOR_LATENCY + "_count", selector=selector)),
        "finished": metric(after, PREFILL + "_count") - metric(before, PREFILL + "_count"),
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


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fmt_s(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}s"


# ------------------------------------------------------------------------------ in-process measurements
def time_in_process(served: Served, repeats: int = 5) -> dict[str, Any]:
    """With the server stopped: the plugin's [CLS]-attention probe on the tower's q/k/v shape (fastest of 25),
    and the same tower (transformers' CLIP, ``vision_layers`` layers) + projector, float32 (median of
    ``repeats``), each at 1 thread and at the machine's thread count (the worker's). The probe is the
    attention-extraction estimate (the fastest of both: on a loaded machine a 2-thread sub-millisecond op mostly
    waits for its second thread); the tower is a cross-check of the vision-encoder estimate from the server."""
    import torch

    threads = sorted({1, os.cpu_count() or 1})
    by_threads = {}
    for count in threads:
        torch.set_num_threads(count)
        by_threads[str(count)] = _time_in_process(served, repeats)
    probes = [r["attention_probe_s"] for r in by_threads.values() if r.get("attention_probe_s") is not None]
    return {
        "views": served.views, "by_threads": by_threads,
        "attention_probe_s": min(probes) if probes else None,
        "vision_tower_projector_s": min(r["vision_tower_projector_s"] for r in by_threads.values()),
        "vision_flops": sum(vision_flops(served.views, served.vision, served.vision_layers,
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
            from textscythe_vllm.pruning import ClsAttentionProbe

            attention = SimpleNamespace(num_heads_per_partition=heads, num_heads=heads, head_dim=c // heads,
                                        scale=(c // heads) ** -0.5, tp_size=1)
            probe = SimpleNamespace(_attention=attention)
            scores = getattr(ClsAttentionProbe, "scores", None) or ClsAttentionProbe._cls_attention
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


# ------------------------------------------------------------------------------------------ analysis
def median_of(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def analyse(outcomes: list[Outcome], served: Served, budgets: list[int], probe_s: float | None,
            rounds: int) -> dict[str, Any]:
    """Per budget: levels (TTFT, prefill, e2e, text-only prefill, ...) are medians over rounds; differences
    between request types (bound (b), the gap TTFT(K) - (b) and its components, the vision encoder) are taken
    within each round -- between requests sent next to each other -- and then the median over rounds, which
    is robust to a load change on a shared machine. Medians of per-round terms need not add up exactly."""
    good = [o for o in outcomes if o.error is None]

    def med(label: str, name: str) -> float | None:
        return median_of([getattr(o, name) for o in good if o.label == label])

    rounds_of = {label: {o.round: o for o in good if o.label == label}
                 for label in {o.label for o in good}}
    n, t = served.num_visual, served.text_tokens
    full = request_flops(t, n, served.views, served.text, served.vision, served.vision_layers)
    real_full = request_flops(t, n, served.views, REAL_TEXT, REAL_VISION, 23)
    llm_scale = REAL_TEXT["num_hidden_layers"] / served.text["num_hidden_layers"]
    served_vision = full["vision_tower"] + full["projector"]
    vision_scale = (real_full["vision_tower"] + real_full["projector"]) / served_vision if served_vision else 1.0
    base_ttft = med(f"image@{NO_BUDGET}", "ttft_s")
    rows = []
    for budget in [None, *budgets]:
        key = NO_BUDGET if budget is None else str(budget)
        visual = n if budget is None else min(budget, n)
        image, text = f"image@{key}", f"text@{key}"
        per_round: dict[str, list[float]] = {}
        for r in range(rounds):
            group = [rounds_of.get(label, {}).get(r) for label in
                     (image, text, f"image@{NO_BUDGET}", f"text@{NO_BUDGET}")]
            if None in group:
                continue
            img, txt, img_full, txt_full = group
            sel = (img.selector_s or 0.0) if budget is not None else 0.0
            bound = img_full.ttft_s - (txt_full.ttft_s - txt.ttft_s)
            values = {
                "bound_b": bound, "gap_b": img.ttft_s - bound, "ttft_over_bound_b": img.ttft_s / bound,
                "vision": img_full.prefill_s - txt_full.prefill_s,
                "residual": (img.prefill_s - sel - txt.prefill_s) - (img_full.prefill_s - txt_full.prefill_s),
                "delta_overhead": ((img.ttft_s - img.prefill_s) - (img_full.ttft_s - img_full.prefill_s)
                                   - (txt.ttft_s - txt.prefill_s) + (txt_full.ttft_s - txt_full.prefill_s)),
                "full_overhead": img_full.ttft_s - img_full.prefill_s,
            }
            control = rounds_of.get(f"control@{key}", {}).get(r)
            if control is not None:
                control_bound = control.ttft_s - (control.selector_s or 0.0)
                values.update(bound_c=control_bound, gap_c=img.ttft_s - control_bound,
                              ttft_over_bound_c=img.ttft_s / control_bound, over_control=img.ttft_s - control.ttft_s)
            for name, value in values.items():
                per_round.setdefault(name, []).append(value)
        paired = {name: statistics.median(values) for name, values in per_round.items()}
        ttft, prefill, e2e = med(image, "ttft_s"), med(image, "prefill_s"), med(image, "e2e_s")
        text_ttft, text_prefill = med(text, "ttft_s"), med(text, "prefill_s")
        overheads = [o.ttft_s - o.prefill_s for o in good if o.label == image]
        selector_metric = (med(image, "selector_s") or 0.0) if budget is not None else 0.0
        attention = min(probe_s or 0.0, selector_metric) if budget is not None else 0.0  # the probe is in the metric
        flops = request_flops(t, visual, served.views, served.text, served.vision, served.vision_layers)
        real = request_flops(t, visual, served.views, REAL_TEXT, REAL_VISION, 23)
        bound_b, gap = paired.get("bound_b"), paired.get("gap_b")
        row: dict[str, Any] = {
            "budget": key, "visual_tokens": visual, "prompt_tokens": t + visual,
            "rounds": len(per_round.get("bound_b", [])),
            "ttft_s": ttft, "prefill_s": prefill, "e2e_s": e2e,
            "ttft_times_s": [o.ttft_s for o in good if o.label == image],
            "ratio_measured": ttft / base_ttft if ttft and base_ttft else None,
            "prefill_ratio_measured": (prefill / med(f"image@{NO_BUDGET}", "prefill_s")
                                       if prefill and med(f"image@{NO_BUDGET}", "prefill_s") else None),
            "flops": flops["total"], "ratio_a": flops["total"] / full["total"],
            "ratio_a_real_model": real["total"] / real_full["total"],
            "ideal_a_s": base_ttft * flops["total"] / full["total"] if base_ttft else None,
            "bound_b_s": bound_b, "ratio_b": bound_b / base_ttft if bound_b and base_ttft else None,
            "gap_b_s": gap,
            "ttft_over_bound_b": 1 + gap / bound_b if gap is not None and bound_b else None,
            "ttft_over_bound_b_per_round": per_round.get("ttft_over_bound_b", []),
            "components_s": {
                "request_overhead": median_of(overheads),
                "vision_encoder": paired.get("vision"),
                "attention_extraction": attention,
                "selector": None if budget is None else selector_metric - attention,
                "llm_prefill": text_prefill,
                "residual": paired.get("residual"),
            },
            "selector_metric_s": selector_metric if budget is not None else None,
            "gap_components_s": None if budget is None else {
                "request_overhead": paired.get("delta_overhead"),
                "vision_encoder": 0.0,  # the same tower runs for every budget; its probe is attention extraction
                "attention_extraction": attention,
                "selector": selector_metric - attention,
                "llm_prefill_residual": paired.get("residual"),
            },
            "text_only": {"tokens": t + visual, "ttft_s": text_ttft, "prefill_s": text_prefill,
                          "prefill_tokens_per_s": (t + visual) / text_prefill if text_prefill else None,
                          "flops": flops["total"] - flops["vision_tower"] - flops["projector"]},
        }
        row["within_10pct_of_b"] = (row["ttft_over_bound_b"] <= 1 + GOAL_FRACTION
                                    if budget is not None and row["ttft_over_bound_b"] is not None else None)
        bound_c, gap_c = paired.get("bound_c"), paired.get("gap_c")
        row["control"] = None if bound_c is None else {
            "ttft_s": med(f"control@{key}", "ttft_s"), "selector_metric_s": med(f"control@{key}", "selector_s"),
            "bound_c_s": bound_c, "gap_c_s": gap_c, "ttft_over_bound_c": 1 + gap_c / bound_c,
            "ttft_over_bound_c_per_round": per_round["ttft_over_bound_c"],
            "ttft_minus_control_s": paired["over_control"],
            "bound_b_per_round_s": per_round.get("bound_b", []), "bound_c_per_round_s": per_round["bound_c"],
        }
        # What the depth cut exaggerates: the costs that do not grow with depth (selector, probe, request
        # overhead), set against bound (b) with the LLM prefill and the vision encoder scaled to the real depth.
        if budget is not None and None not in (text_prefill, paired.get("vision"), paired.get("full_overhead")):
            fixed = attention + (selector_metric - attention) + (paired.get("delta_overhead") or 0.0)
            bound_real = llm_scale * text_prefill + vision_scale * paired["vision"] + paired["full_overhead"]
            row["real_depth_projection"] = {
                "llm_scale": llm_scale, "vision_scale": vision_scale, "bound_b_s": bound_real,
                "fixed_gap_s": fixed, "fixed_gap_over_bound_b": fixed / bound_real,
            }
        else:
            row["real_depth_projection"] = None
        rows.append(row)
    return {"rows": rows, "flops_full": full, "flops_full_real_model": real_full}


def concurrency_verdicts(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    verdicts = []
    for level in levels:
        pruned, unpruned = level["pruned"], level["unpruned"]
        checks = {
            "throughput": pruned["requests_per_s"] >= unpruned["requests_per_s"],
            "ttft_p50": (pruned["ttft_p50_s"] or math.inf) <= (unpruned["ttft_p50_s"] or math.inf),
            "ttft_p95": (pruned["ttft_p95_s"] or math.inf) <= (unpruned["ttft_p95_s"] or math.inf),
            "e2e_p50": (pruned["e2e_p50_s"] or math.inf) <= (unpruned["e2e_p50_s"] or math.inf),
        }
        verdicts.append({"concurrency": level["concurrency"], **checks, "never_slower": all(checks.values()),
                         "speedup_throughput": pruned["requests_per_s"] / unpruned["requests_per_s"]})
    return verdicts


# ------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    from textscythe_dev.server import VLLMServer
    from textscythe_dev.tiny_models import build_tiny_tokenizer

    started = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="textscythe-serving-") as scratch:
        served = build_model(args, Path(scratch) / "model")
        log(f"model: {args.shape}-shaped, LLM {served.text['num_hidden_layers']} x {served.text['hidden_size']}, "
            f"CLIP {served.vision_layers} x {served.vision['hidden_size']}, N={served.num_visual} in {served.views} "
            f"view(s), T={served.text_tokens}; vision/LLM FLOPs {served.scaling['ratio_mismatch']:.2f} x the real ratio")
        tokenizer = build_tiny_tokenizer()
        n, t = served.num_visual, served.text_tokens
        specs = [Spec("image", None, t + n), *(Spec("image", k, t + min(k, n)) for k in args.budgets),
                 Spec("text", None, t + n), *(Spec("text", k, t + min(k, n)) for k in args.budgets)]
        if args.control_selector:
            specs += [Spec("control", k, t + min(k, n)) for k in args.budgets]
        server_args = ["--load-format", "dummy", "--dtype", "float32", "--seed", str(args.seed),
                       "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]
        log_path = args.server_log or Path(scratch) / "vllm.log"
        server = VLLMServer(served.model_dir, server_args, log_path=log_path, env={"VLLM_CPU_KVCACHE_SPACE": "2"},
                            served_model_name="llava-shaped")
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

    report = {
        "config": {
            "shape": args.shape, "real_model": SHAPES[args.shape]["real"], "quick": args.quick,
            "budgets": args.budgets, "selector": args.selector, "control_selector": args.control_selector,
            "rounds": args.rounds, "warmup": args.warmup,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "seed": args.seed,
            "image_px": SHAPES[args.shape]["image_px"], "views": served.views,
            "visual_tokens_N": served.num_visual, "text_tokens_T": served.text_tokens, "question": QUESTION,
            "served_text_config": {k: served.text.get(k) for k in REAL_TEXT},
            "served_vision_config": {**{k: served.vision.get(k) for k in REAL_VISION},
                                     "layers_run": served.vision_layers},
            "real_text_config": REAL_TEXT, "real_vision_config": {**REAL_VISION, "layers_run": 23},
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
    return summarise(report)


def served_from_config(config: dict[str, Any]) -> Served:
    """What the FLOP model needs, from a report's ``config`` (for ``--reanalyse``)."""
    vision = dict(config["served_vision_config"])
    return Served(Path(), dict(config["served_text_config"]), vision, vision.pop("layers_run"), config["views"],
                  config["visual_tokens_N"], config["text_tokens_T"], config["scaling"])


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Add the analysis (``flop_model``, ``single_stream``, ``verdicts``) to a report of raw measurements."""
    config = report["config"]
    served = served_from_config(config)
    outcomes = [Outcome(**o) for o in report["requests"]]
    analysis = analyse(outcomes, served, config["budgets"], report["in_process"].get("attention_probe_s"),
                       config["rounds"])
    verdicts = concurrency_verdicts(report["concurrency"])
    pruned_rows = [r for r in analysis["rows"] if r["budget"] != NO_BUDGET]
    report["flop_model"] = {"full_served": analysis["flops_full"], "full_real_model": analysis["flops_full_real_model"]}
    report["single_stream"] = analysis["rows"]
    report["verdicts"] = {
        "ttft_within_10pct_of_bound_b": (all(r["within_10pct_of_b"] for r in pruned_rows)
                                         if pruned_rows and all(r["within_10pct_of_b"] is not None
                                                                for r in pruned_rows) else None),
        "ttft_within_10pct_of_bound_c": (all(r["control"]["ttft_over_bound_c"] <= 1 + GOAL_FRACTION
                                             for r in pruned_rows)
                                         if pruned_rows and all(r.get("control") for r in pruned_rows) else None),
        "per_concurrency": verdicts,
        "never_slower": all(v["never_slower"] for v in verdicts) if verdicts else None,
        "meaningful": not config["quick"],
    }
    return report


# ------------------------------------------------------------------------------------------ output
def _ms(value: float | None) -> str:
    return "–" if value is None else f"{1000 * value:,.0f}"


def _x(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _range(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``min–max`` of per-round values (``–`` when there are none)."""
    return f"{scale * min(values):,.{digits}f}–{scale * max(values):,.{digits}f}" if values else "–"


def markdown_table(report: dict[str, Any]) -> str:
    config, rows = report["config"], report["single_stream"]
    n, t = config["visual_tokens_N"], config["text_tokens_T"]
    lines = [
        f"TTFT, prefill and end-to-end latency per budget (ms, medians of {config['rounds']} interleaved rounds); "
        "bound (b), the gap TTFT(K) - (b) and the vision encoder are medians of per-round differences between "
        "neighbouring requests; TTFT / bound (b) = 1 + gap / (b); "
        f"ideal (a) = TTFT(none) x FLOPs(K) / FLOPs(none); bound (b) = TTFT(none) - [TTFT_text(T+N) - "
        f"TTFT_text(T+K)], T = {t}, N = {n}",
        "",
        "| budget | prompt tokens | TTFT | prefill | e2e | TTFT / TTFT(none) | ratio (a) | ratio (a), real 7B "
        "| ratio (b) | ideal (a) | bound (b) | TTFT / bound (b) | per round (min–max) | within 10% of (b) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        within = "–" if r["within_10pct_of_b"] is None else ("yes" if r["within_10pct_of_b"] else "**no**")
        spread = _range(r["ttft_over_bound_b_per_round"]) if r["budget"] != NO_BUDGET else "–"
        lines.append(
            f"| {r['budget']} | {r['prompt_tokens']} | {_ms(r['ttft_s'])} | {_ms(r['prefill_s'])} | {_ms(r['e2e_s'])} "
            f"| {_x(r['ratio_measured'])} | {_x(r['ratio_a'])} | {_x(r['ratio_a_real_model'])} | {_x(r['ratio_b'])} "
            f"| {_ms(r['ideal_a_s'])} | {_ms(r['bound_b_s'])} | {_x(r['ttft_over_bound_b'])} | {spread} | {within} |")
    controls = [r for r in rows if r.get("control")]
    if controls:
        lines += [
            "",
            f"Cross-check with a near-free selector: the same request pruned to the same K by "
            f"`{config.get('control_selector')}` (no text, no attention), sent next to it in every round. Bound (c) "
            "= TTFT(control) - its selector time: the image path plus a T+K prefill, measured directly between "
            "neighbours of K-sized requests, where (b) subtracts two T+N prefills (whose noise is the size of the "
            "bound at high N). TTFT / bound (c) = 1 + median gap / median (c).",
            "",
            "| budget | TTFT | TTFT (control) | TTFT - TTFT (control) | bound (b) | (b) per round | bound (c) "
            "| (c) per round | TTFT / bound (c) | per round |",
            "|---|---:|---:|---:|---:|---|---:|---|---:|---|",
        ]
        for r in controls:
            c = r["control"]
            lines.append(
                f"| {r['budget']} | {_ms(r['ttft_s'])} | {_ms(c['ttft_s'])} | {_ms(c['ttft_minus_control_s'])} "
                f"| {_ms(r['bound_b_s'])} | {_range(c['bound_b_per_round_s'], 1000.0, 0)} | {_ms(c['bound_c_s'])} "
                f"| {_range(c['bound_c_per_round_s'], 1000.0, 0)} | {_x(c['ttft_over_bound_c'])} "
                f"| {_range(c['ttft_over_bound_c_per_round'])} |")
    lines += [
        "",
        "Components of TTFT (ms, medians): request overhead = TTFT - vLLM prefill time; vision encoder = "
        "prefill(image, none) - prefill(text, T+N), per round; attention = the plugin's probe (in-process); selector = worker "
        "selector metric - attention; LLM prefill = prefill(text, T+K); residual = the rest of the image request's "
        "prefill, relative to budget none",
        "",
        "| budget | TTFT | request overhead | vision encoder | attention extraction | selector | LLM prefill | residual |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["components_s"]
        lines.append(f"| {r['budget']} | {_ms(r['ttft_s'])} | {_ms(c['request_overhead'])} | {_ms(c['vision_encoder'])} "
                     f"| {_x(None if c['attention_extraction'] is None else 1000 * c['attention_extraction'], 1)} "
                     f"| {_x(None if c['selector'] is None else 1000 * c['selector'], 1)} | {_ms(c['llm_prefill'])} "
                     f"| {_ms(c['residual'])} |")
    lines += [
        "",
        "Gap TTFT(K) - bound (b) by component (ms, medians of per-round values; % of bound (b)). Vision encoder: "
        "0 by construction (the same tower runs at every budget, so (b) contains it). Last column: attention + "
        "selector + request overhead (the costs that do not grow with depth) against bound (b) with the LLM "
        "prefill and the vision encoder scaled to the real model's depth (a projection, not a measurement).",
        "",
        "| budget | gap | % of (b) | request overhead | vision encoder | attention extraction | selector "
        "| LLM prefill (residual) | fixed costs at real depth, % of (b) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["gap_components_s"]
        if g is None:
            continue
        share = None if not r["bound_b_s"] or r["gap_b_s"] is None else 100 * r["gap_b_s"] / r["bound_b_s"]
        projection = r.get("real_depth_projection")
        real_share = None if not projection else 100 * projection["fixed_gap_over_bound_b"]
        lines.append(f"| {r['budget']} | {_ms(r['gap_b_s'])} | {_x(share, 1)}% | {_ms(g['request_overhead'])} "
                     f"| {_ms(g['vision_encoder'])} | {_x(1000 * g['attention_extraction'], 1)} "
                     f"| {_x(1000 * g['selector'], 1)} | {_ms(g['llm_prefill_residual'])} | {_x(real_share, 1)}% |")
    lines += [
        "",
        "Text-only prefills (the LLM alone; GFLOP/s falls with the token count: smaller GEMMs run less efficiently)",
        "",
        "| tokens | TTFT (ms) | prefill (ms) | tokens/s | GFLOP/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tx = r["text_only"]
        gflops = None if not tx["prefill_s"] else tx["flops"] / tx["prefill_s"] / 1e9
        lines.append(f"| {tx['tokens']} | {_ms(tx['ttft_s'])} | {_ms(tx['prefill_s'])} "
                     f"| {_x(tx['prefill_tokens_per_s'], 0)} | {_x(gflops, 1)} |")
    if report["concurrency"]:
        lines += [
            "",
            "Concurrency: the same number of requests, each with its own image, with mixed budgets "
            f"({', '.join(str(b) for b in config['budgets'])}, cycling) vs without budgets; {config['max_tokens']} "
            "output tokens each (latencies in ms)",
            "",
            "| concurrency | mode | requests | errors | req/s | output tok/s | TTFT p50 | TTFT p95 | e2e p50 | e2e p95 "
            "| speed-up | never slower |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        verdicts = {v["concurrency"]: v for v in report["verdicts"]["per_concurrency"]}
        for level in report["concurrency"]:
            verdict = verdicts[level["concurrency"]]
            for mode in ("unpruned", "pruned"):
                m = level[mode]
                extra = (f"{verdict['speedup_throughput']:.2f}x | {'yes' if verdict['never_slower'] else '**no**'}"
                         if mode == "pruned" else "| ")
                lines.append(f"| {level['concurrency']} | {mode} | {m['requests']} | {m['errors']} "
                             f"| {m['requests_per_s']:.3f} | {m['output_tokens_per_s']:.2f} | {_ms(m['ttft_p50_s'])} "
                             f"| {_ms(m['ttft_p95_s'])} | {_ms(m['e2e_p50_s'])} | {_ms(m['e2e_p95_s'])} | {extra} |")
    scaling, inproc = config["scaling"], report["in_process"]
    vision_s = rows[0]["components_s"]["vision_encoder"]
    vision_gflops = sum(report["flop_model"]["full_served"][k] for k in ("vision_tower", "projector")) / 1e9
    by_threads = inproc.get("by_threads") or {str(inproc.get("threads", "?")): inproc}
    cross = "; ".join(f"{threads} thread(s): tower + projector {_ms(r.get('vision_tower_projector_s'))} ms, "
                      f"probe {_x(None if r.get('attention_probe_s') is None else 1000 * r['attention_probe_s'], 2)} ms"
                      for threads, r in by_threads.items())
    lines += [
        "",
        f"Scaling: LLM {scaling['llm_layers']} of {scaling['llm_layers_real']} layers, CLIP {scaling['vision_layers_run']} "
        f"of {scaling['vision_layers_run_real']}; vision/LLM FLOPs {scaling['vision_to_llm_flops_served']:.4f} served vs "
        f"{scaling['vision_to_llm_flops_real']:.4f} real ({scaling['ratio_mismatch']:.2f} x). Vision encoder on the "
        f"server: {_ms(vision_s)} ms for {vision_gflops:.1f} GFLOP "
        f"({_x(None if not vision_s else vision_gflops / vision_s, 0)} GFLOP/s). In process (server stopped): {cross}.",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["single_stream"]
    panels = 2 if report["concurrency"] else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    axis = axes[0][0]
    labels = [r["budget"] for r in rows]
    xs = list(range(len(rows)))
    bottoms = [0.0] * len(rows)
    parts = [("request_overhead", "request overhead"), ("vision_encoder", "vision encoder"),
             ("attention_extraction", "attention + selector"), ("llm_prefill", "LLM prefill"), ("residual", "residual")]
    for key, label in parts:
        heights = []
        for r in rows:
            c = r["components_s"]
            value = c[key] or 0.0
            if key == "attention_extraction":
                value += c["selector"] or 0.0
            heights.append(max(value, 0.0))
        axis.bar(xs, heights, 0.55, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axis.plot(xs, [r["ttft_s"] for r in rows], "ko", label="TTFT (measured)", zorder=4)
    axis.plot(xs, [r["bound_b_s"] for r in rows], "r_", markersize=26, markeredgewidth=2.5, label="bound (b)", zorder=3)
    axis.plot(xs, [r["ideal_a_s"] for r in rows], "b_", markersize=26, markeredgewidth=2.5, label="FLOP ideal (a)", zorder=3)
    if any(r.get("control") for r in rows):
        axis.plot(xs, [r["control"]["bound_c_s"] if r.get("control") else None for r in rows], "g_", markersize=26,
                  markeredgewidth=2.5, label="bound (c): near-free selector", zorder=3)
    axis.set_xticks(xs, labels)
    axis.set_xlabel("visual token budget")
    axis.set_ylabel("seconds")
    config = report["config"]
    axis.set_title(f"{config['shape']}-shaped, N={config['visual_tokens_N']}, T={config['text_tokens_T']}: TTFT",
                   fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
    if report["concurrency"]:
        axis = axes[0][1]
        levels = report["concurrency"]
        cx = list(range(len(levels)))
        width = 0.38
        for offset, mode in ((-width / 2, "unpruned"), (width / 2, "pruned")):
            axis.bar([x + offset for x in cx], [lv[mode]["requests_per_s"] for lv in levels], width, label=f"{mode}: req/s")
        axis.set_xticks(cx, [f"c={lv['concurrency']}" for lv in levels])
        axis.set_ylabel("requests / s")
        twin = axis.twinx()
        for mode, style in (("unpruned", "s--"), ("pruned", "o-")):
            twin.plot(cx, [lv[mode]["ttft_p50_s"] for lv in levels], style, color="black", label=f"{mode}: TTFT p50")
            twin.plot(cx, [lv[mode]["ttft_p95_s"] for lv in levels], style, color="grey", label=f"{mode}: TTFT p95")
        twin.set_ylabel("TTFT (s)")
        twin.set_yscale("log")
        handles = axis.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        axis.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=7, loc="upper left")
        axis.set_title(f"mixed budgets {config['budgets']} vs none", fontsize=9)
    env = report["environment"]
    figure.suptitle(f"vLLM {env['vllm']} CPU float32, {env['cpu_count']} cores; random weights; "
                    f"LLM {config['scaling']['llm_layers']} layers, CLIP {config['scaling']['vision_layers_run']}",
                    fontsize=9)
    save_figure(figure, path)


def header_of(report: dict[str, Any]) -> str:
    config, env = report["config"], report["environment"]
    text, vision = config["served_text_config"], config["served_vision_config"]
    return (f"Serving benchmark, {config['shape']}-shaped ({config['real_model']} widths"
            f"{', quick: tiny widths' if config['quick'] else ''}): LLM {text['num_hidden_layers']} x "
            f"{text['hidden_size']} (MLP {text['intermediate_size']}), CLIP {vision['layers_run']} x "
            f"{vision['hidden_size']}, random weights, float32; vLLM {env['vllm']} CPU ({env['cpu_count']} cores, "
            f"load {env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}), selector {config['selector']}, "
            f"{config['max_tokens']} output tokens, prefix and multimodal caches off; {env['total_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # --reanalyse: the tables and the plot again from a saved report's raw measurements
    report = summarise(json.loads(args.reanalyse.read_text())) if args.reanalyse is not None else run(args)
    header, table = header_of(report), markdown_table(report)
    show(header, table)
    write_report(args.out, report, header, table, None if args.no_plot else plot)
    if report["errors"] or any(lv[m]["errors"] for lv in report["concurrency"] for m in ("pruned", "unpruned")):
        print(f"requests failed, e.g. {report['error_examples'][:1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
