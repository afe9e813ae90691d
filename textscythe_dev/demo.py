"""The main job: what the product is for, shown on this machine with real ``vllm serve`` and the plugin.

1. **The question decides what is kept.** A LLaVA-1.5-shaped model hand-wired so the right answer is known (a
   patch's visual token *is* the LLM's embedding of its colour's word; ``textscythe_dev/colour_model.py``) is asked three
   questions about one picture -- a red rectangle, a blue circle, a yellow square on black -- at the same budget,
   under an operator's system prompt. For each question the demo prints the key words TextScythe found (from the
   explain route) and how much of the asked shape was kept, and draws the kept patches.
2. **It is faster.** A LLaVA-1.5-7B-shaped model (Vicuna-7B and CLIP-L widths, random weights, depth cut to
   ``--llm-layers`` of 32 LLM layers with the CLIP depth that keeps the real vision:LLM FLOP ratio) is asked one
   question per budget none / 192 / 64 in interleaved rounds, each with its own picture; the demo prints the
   median time to first token, the speed-up and the FLOP-proportional ideal it is measured against.

    python -m textscythe_dev.demo [--workdir artifacts/demo] [--rounds 3] [--llm-layers 3]

Writes ``demo.png`` (kept patches per question and the TTFT bars) and ``results.json`` in the work directory.
The weights are not trained: the generated answers are meaningless; token counts, kept patches and timings are
real.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = ("You are a helpful visual assistant for an online shop. Answer in one short phrase, name the "
                 "colour and the position of what is asked, and do not guess about anything you cannot see.")
QUESTIONS = (("red", "where is the red rectangle ?"), ("blue", "where is the blue circle ?"),
             ("yellow", "where is the yellow square ?"))
GUIDANCE_BUDGET = 64
SPEED_BUDGETS: tuple[int | None, ...] = (None, 192, 64)
SPEED_QUESTION = "please describe the picture in detail , what is in the middle of the scene ?"


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- part 1: guidance ---------------------------------------------------------------------------------------
def guidance(workdir: Path) -> list[dict[str, Any]]:
    import httpx
    import openai

    from textscythe_dev.colour_model import build_colour_llava, colour_scene, shape_patches
    from textscythe_dev.images import data_url
    from textscythe_dev.server import VLLMServer

    model_dir = workdir / "colour-llava"
    log("building the hand-wired colour model (a patch's token = its colour word's embedding) ...")
    build_colour_llava(model_dir)
    picture = colour_scene()
    picture.save(workdir / "picture.png")
    patches = shape_patches()
    log("starting vllm serve with the plugin on the colour model ...")
    started = time.perf_counter()
    with VLLMServer(model_dir, ["--dtype", "float32", "--seed", "0"], log_path=workdir / "vllm-colour.log",
                    served_model_name="colour-llava") as server:
        log(f"  ready in {time.perf_counter() - started:.0f} s")
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        rows = []
        for colour, question in QUESTIONS:
            response = client.chat.completions.create(
                model=server.model_name, max_tokens=4, temperature=0.0,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                                       {"type": "text", "text": question}]}],
                extra_body={"visual_token_budget": GUIDANCE_BUDGET, "visual_token_explain": True},
            )
            explanation = httpx.get(f"{server.base_url}/v1/textscythe/explanations/{response.id}", timeout=30)
            explanation.raise_for_status()
            (item,) = explanation.json()["items"]
            kept, asked = set(item["kept_positions"]), set(patches[colour])
            rows.append({
                "question": question, "colour": colour, "budget": GUIDANCE_BUDGET, "tokens": item["num_tokens"],
                "key_words": [token["token"].strip() for token in item["key_tokens"]],
                "asked_patches": len(asked), "asked_kept": len(kept & asked),
                "asked_share_kept": round(len(kept & asked) / len(asked), 3),
                "kept_on_asked_shape": round(len(kept & asked) / len(kept), 3),
                "prompt_tokens": response.usage.prompt_tokens, "kept_positions": sorted(kept), "item": item,
            })
            log(f"  {question!r}: key words {rows[-1]['key_words']}, kept {len(kept & asked)} of the "
                f"{len(asked)} {colour} patches")
    return rows


# --- part 2: speed ------------------------------------------------------------------------------------------
def speed(workdir: Path, rounds: int, llm_layers: int) -> dict[str, Any]:
    import random

    import openai

    from textscythe_dev.images import data_url, scene
    from textscythe_dev.llava_7b_shape import build_seven_b_shaped, request_flops
    from textscythe_dev.server import VLLMServer
    from textscythe_dev.tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text_tokens = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SPEED_QUESTION}]}],
        tokenize=True, add_generation_prompt=True, return_dict=False,
    )) - 1  # the <image> placeholder
    model_dir = workdir / f"llava-7b-shaped-{llm_layers}"
    log(f"building a LLaVA-1.5-7B-shaped checkpoint ({llm_layers} of 32 LLM layers, real widths, random weights) ...")
    build_seven_b_shaped(model_dir, llm_layers, text_tokens)
    config = json.loads((model_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    vision_layers = vision["num_hidden_layers"] + config["vision_feature_layer"] + 1
    log("starting vllm serve with the plugin on it (caches off, every request its own picture) ...")
    started = time.perf_counter()
    server_args = ["--load-format", "dummy", "--dtype", "float32", "--seed", "0", "--no-enable-prefix-caching",
                   "--mm-processor-cache-gb", "0"]
    with VLLMServer(model_dir, server_args, log_path=workdir / "vllm-7b-shaped.log",
                    served_model_name="llava-7b-shaped") as server:
        log(f"  ready in {time.perf_counter() - started:.0f} s")
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
        seed = 1000

        def ttft(budget: int | None) -> tuple[float, int]:
            nonlocal seed
            seed += 1
            message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene(seed))}},
                                                    {"type": "text", "text": SPEED_QUESTION}]}
            extra = {} if budget is None else {"visual_token_budget": budget}
            begin = time.perf_counter()
            stream = client.chat.completions.create(
                model=server.model_name, messages=[message], max_tokens=2, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_body=extra or None,
            )
            first, prompt_tokens = None, 0
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
                    first = time.perf_counter() - begin
                if chunk.usage is not None:
                    prompt_tokens = chunk.usage.prompt_tokens
            return (time.perf_counter() - begin if first is None else first), prompt_tokens

        for budget in SPEED_BUDGETS:  # warm-up: first-request overheads are not pruning's business
            ttft(budget)
        samples: dict[str, list[float]] = {label(b): [] for b in SPEED_BUDGETS}
        prompt_tokens: dict[str, int] = {}
        order = random.Random(0)
        for round_index in range(rounds):
            budgets = list(SPEED_BUDGETS)
            order.shuffle(budgets)
            for budget in budgets:
                seconds, tokens = ttft(budget)
                samples[label(budget)].append(seconds)
                prompt_tokens[label(budget)] = tokens
            log(f"  round {round_index + 1}/{rounds}: " + ", ".join(
                f"{label(b)} {samples[label(b)][-1]:.2f} s" for b in SPEED_BUDGETS))
    full = request_flops(text_tokens, 576, 1, text, vision, vision_layers)["total"]
    unpruned = statistics.median(samples["none"])
    rows = []
    for budget in SPEED_BUDGETS:
        median = statistics.median(samples[label(budget)])
        flops = request_flops(text_tokens, 576 if budget is None else min(budget, 576), 1, text, vision, vision_layers)
        rows.append({"budget": label(budget), "prompt_tokens": prompt_tokens[label(budget)], "ttft_s": round(median, 3),
                     "speedup": round(unpruned / median, 2), "flop_ideal_s": round(unpruned * flops["total"] / full, 3),
                     "samples_s": [round(x, 3) for x in samples[label(budget)]]})
    return {"rows": rows, "rounds": rounds, "llm_layers": text["num_hidden_layers"], "vision_layers": vision_layers,
            "text_tokens": text_tokens, "cores": os.cpu_count()}


def label(budget: int | None) -> str:
    return "none" if budget is None else str(budget)


# --- the picture and the printout ---------------------------------------------------------------------------
def draw(workdir: Path, guided: list[dict[str, Any]], timed: dict[str, Any]) -> Path:
    import matplotlib
    from PIL import Image

    from textscythe_vllm.draw import draw_kept

    matplotlib.use("Agg")
    from matplotlib import pyplot

    picture = Image.open(workdir / "picture.png")
    figure, axes = pyplot.subplots(1, len(guided) + 1, figsize=(4.2 * (len(guided) + 1), 4.6),
                                   gridspec_kw={"width_ratios": [1] * len(guided) + [1.2]})
    for axis, row in zip(axes, guided, strict=False):
        axis.imshow(draw_kept(picture, row["item"]))
        axis.set_title(f"\"{row['question']}\"\nkey word: {', '.join(row['key_words']) or '-'}; "
                       f"{row['asked_kept']}/{row['asked_patches']} {row['colour']} patches kept", fontsize=9)
        axis.axis("off")
    bars = axes[-1]
    labels = [f"{row['budget']}\n({row['prompt_tokens']} tok)" for row in timed["rows"]]
    bars.bar(labels, [row["ttft_s"] for row in timed["rows"]], color=["#888888", "#4a90d9", "#1f5fa8"])
    bars.scatter(labels, [row["flop_ideal_s"] for row in timed["rows"]], marker="_", s=900, color="black",
                 label="FLOP-proportional ideal", zorder=3)
    for index, row in enumerate(timed["rows"]):
        top = max(row["ttft_s"], row["flop_ideal_s"])
        bars.text(index, top * 1.03, f"{row['ttft_s']:.2f} s  {row['speedup']:.1f}x", ha="center", va="bottom",
                  fontsize=8)
    bars.set_ylim(0, max(row["ttft_s"] for row in timed["rows"]) * 1.2)
    bars.set_ylabel("time to first token (s, median)")
    bars.set_title(f"LLaVA-1.5-7B-shaped ({timed['llm_layers']}/32 LLM layers), {timed['cores']} CPU cores",
                   fontsize=9)
    bars.legend(fontsize=8)
    figure.suptitle(f"K = {GUIDANCE_BUDGET} of 576 visual tokens: what each question keeps (hand-wired colour "
                    "model, system prompt on)", fontsize=10)
    figure.tight_layout()
    path = workdir / "demo.png"
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def report(guided: list[dict[str, Any]], timed: dict[str, Any]) -> str:
    lines = [f"\nWhat the question keeps (K = {GUIDANCE_BUDGET} of 576, same picture, same system prompt):",
             "| question | key words | asked shape kept | kept tokens on it |", "|---|---|---:|---:|"]
    for row in guided:
        lines.append(f"| {row['question']} | {', '.join(row['key_words']) or '-'} | {row['asked_kept']}/"
                     f"{row['asked_patches']} ({100 * row['asked_share_kept']:.0f}%) | "
                     f"{100 * row['kept_on_asked_shape']:.0f}% |")
    kept_sets = {tuple(row["kept_positions"]) for row in guided}
    lines.append(f"different kept sets for different questions: {len(kept_sets) == len(guided)}")
    lines += ["", f"How fast (LLaVA-1.5-7B-shaped, {timed['llm_layers']} of 32 LLM layers, {timed['vision_layers']} "
              f"of 23 CLIP layers, random weights; median of {timed['rounds']} interleaved rounds on "
              f"{timed['cores']} CPU cores; TTFT measured at the client, first streamed token):",
              "| budget | prompt tokens | TTFT (s) | speed-up | FLOP-proportional ideal (s) |", "|---|---:|---:|---:|---:|"]
    for row in timed["rows"]:
        lines.append(f"| {row['budget']} | {row['prompt_tokens']} | {row['ttft_s']:.3f} | {row['speedup']:.2f}x | "
                     f"{row['flop_ideal_s']:.3f} |")
    lines.append("FLOP-proportional ideal = TTFT(none) x FLOPs(K) / FLOPs(none) (vision tower + projector + LLM "
                 "prefill): the TTFT if time followed the FLOPs that pruning removes. Random weights: the answers are "
                 "meaningless; token counts, kept patches and times are real.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of budgets none/192/64 (default 3)")
    parser.add_argument("--llm-layers", type=int, default=3, help="LLM layers of the 7B-shaped model (default 3)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.llm_layers < 1:
        parser.error("--rounds and --llm-layers must be >= 1")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log("part 1 of 2: the question decides what is kept")
    guided = guidance(workdir)
    log("part 2 of 2: time to first token by budget")
    timed = speed(workdir, args.rounds, args.llm_layers)
    picture = draw(workdir, guided, timed)
    (workdir / "results.json").write_text(json.dumps(
        {"guidance": [{k: v for k, v in row.items() if k != "item"} for row in guided], "speed": timed}, indent=2))
    print(report(guided, timed))
    print(f"\npicture: {picture}\nresults: {workdir / 'results.json'}\ndemo took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
