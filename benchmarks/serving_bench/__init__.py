"""End-to-end serving benchmark: what does a visual-token budget buy on a real ``vllm serve`` with the plugin?

The model is LLaVA-1.5-7B-shaped (``--shape llava-1.5``: Vicuna-7B's width -- hidden 4096, 32 heads of 128,
MLP 11008 -- behind a CLIP ViT-L/14-336 tower: hidden 1024, 16 heads, MLP 4096, 576 visual tokens) or
LLaVA-NeXT-7B-shaped (``--shape llava-next``: the same LLM and tower, any-resolution tiling; a 672 x 672 image
is 5 views, 2,880 visual tokens plus 48 newline rows = 2,928) or Qwen3-VL-8B-shaped (``--shape qwen3-vl-8b``:
Qwen3-8B -- hidden 4096, 32 query / 8 KV heads of 128, MLP 12288, interleaved M-RoPE -- behind Qwen3-VL's ViT:
hidden 1152, 16 heads, MLP 4304, 16 px patches, 2 x 2 merging, DeepStack mergers after 3 blocks whose outputs are
added in the first 3 LLM layers; a 1024 x 1024 image is 1,024 visual tokens; see
:mod:`textscythe_dev.qwen3_vl_8b_shape`), with random weights (``--load-format dummy``)
and **fewer layers**: ``--llm-layers`` of the 32 LLM layers and ``--vision-layers`` of the 23 tower layers
vLLM runs (LLaVA's feature layer is the penultimate; Qwen3-VL: of 36 LLM layers and 27 ViT blocks, at least 3
blocks -- one per DeepStack level, the taps mapped proportionally onto the cut tower -- default 6 LLM layers, which
give 3 blocks at 0.98x the real ratio). Unless given, the vision layers are chosen so that the
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
* concurrency ``--concurrency`` (default 1 4 16; LLaVA-NeXT, Qwen3-VL: 4): the same burst of requests with mixed
  budgets (cycling through ``--budgets``) and without budgets, side by side: throughput, TTFT and latency
  p50 / p95. Pruning must never be slower.

    python benchmarks/serving.py                          # LLaVA-1.5-shaped, ~13-20 min on 2 cores
    python benchmarks/serving.py --shape llava-next       # 2,928 visual tokens -> 320, ~19-23 min
    python benchmarks/serving.py --shape qwen3-vl-8b      # 1,024 visual tokens -> 256 / 102 (25% / 10%), ~30-35 min
    python benchmarks/serving.py --quick                  # smoke run: tiny widths, ~1.5-3 min
    python benchmarks/serving.py --reanalyse benchmarks/results/serving.json --out /tmp/s.json  # no server

(``python benchmarks/serving_bench ...`` and, from ``benchmarks/``, ``python -m serving_bench ...`` run the same.)
Writes JSON (``--out``, default benchmarks/results/serving.json, ``serving_next.json`` for LLaVA-NeXT,
``serving_qwen3.json`` for Qwen3-VL-8B), the
Markdown tables next to it (``.md``) and a plot (``.png``); prints the tables.

The package (``benchmarks/serving.py`` is its entry script):

* :mod:`.flops`: the shapes, the served model's numbers, the analytic FLOP models (per family: :func:`.flops.family`)
  and the scaling rule;
* :mod:`.client`: the checkpoint, ``vllm serve``, the requests, client-side timing and metric scraping, the
  in-process timings; :func:`.client.run` returns the raw measurements;
* :mod:`.analysis`: ideal (a) vs bounds (b) and (c), the gap by component, percentiles, the verdicts
  (:func:`.analysis.summarise`, also for ``--reanalyse``);
* :mod:`.report`: the tables, the plot, the files (through ``benchmarks/_report.py``);
* :mod:`.cli`: the command line (:func:`.cli.main`).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent
if str(BENCHMARKS_DIR) not in sys.path:  # the shared report writer (``_report``), also when loaded by path
    sys.path.insert(0, str(BENCHMARKS_DIR))

import _report  # noqa: E402, F401  -- puts the checkout on sys.path (``textscythe_dev``) before the modules load
