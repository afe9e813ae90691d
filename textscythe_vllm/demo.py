"""The main job: a tiny local LLaVA served by real ``vllm serve`` with the plugin, asked one question about one
image with budgets none / 192 / 64, printing what pruning did and drawing which patches were kept.

    python -m textscythe_vllm.demo [--workdir artifacts/demo] [--budgets none,192,64] [--selector textscythe]

Everything is local: the model is built once (random weights, LLaVA-1.5 shapes: 336 px CLIP tower, 576
visual tokens per image) and served on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from textscythe_vllm.pruning import SELECTION_LOG_ENV
from textscythe_vllm.testing.images import scene, user_message
from textscythe_vllm.testing.server import VLLMServer

PATCH = 14
GRID = 24  # 336 / 14


def parse_budgets(text: str) -> list[int | None]:
    return [None if item.strip().lower() == "none" else int(item) for item in text.split(",")]


def draw_kept(image: Image.Image, kept: list[int] | None, title: str) -> Image.Image:
    """The image with dropped patches dimmed and kept patches outlined, under a title bar."""
    panel = Image.new("RGB", (image.width, image.height + 24), "white")
    base = image.convert("RGB")
    if kept is not None:
        dimmed = Image.blend(base, Image.new("RGB", base.size, "black"), 0.75)
        mask = Image.new("L", base.size, 0)
        mask_draw = ImageDraw.Draw(mask)
        for position in kept:
            row, col = divmod(position, GRID)
            mask_draw.rectangle([col * PATCH, row * PATCH, (col + 1) * PATCH - 1, (row + 1) * PATCH - 1], fill=255)
        base = Image.composite(base, dimmed, mask)
    panel.paste(base, (0, 24))
    ImageDraw.Draw(panel).text((6, 6), title, fill="black")
    return panel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets("none,192,64"))
    parser.add_argument("--selector", default="textscythe")
    parser.add_argument("--question", default="what colour is the umbrella next to the red car ?")
    args = parser.parse_args(argv)

    from textscythe_vllm.testing.tiny_models import build_tiny_llava

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "tiny-llava-1.5"
    if not (model_dir / "config.json").exists():
        print(f"building a tiny LLaVA-1.5 (random weights) in {model_dir} ...", flush=True)
        build_tiny_llava(model_dir, kind="llava-1.5", with_weights=True)
    selection_log = workdir / "selections.jsonl"
    selection_log.write_text("")
    image = scene(seed=3)
    image.save(workdir / "image.png")

    import openai

    print("starting vllm serve with the textscythe plugin (about a minute on CPU) ...", flush=True)
    server_args = ["--seed", "0", "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]
    with VLLMServer(model_dir, server_args, env={SELECTION_LOG_ENV: str(selection_log)},
                    log_path=workdir / "vllm-serve.log") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(budget: int | None) -> tuple[object, float]:
            extra = {"visual_token_selector": args.selector}
            if budget is not None:
                extra["visual_token_budget"] = budget
            started = time.perf_counter()
            response = client.chat.completions.create(
                model=server.model_name, messages=[user_message(args.question, image)],
                max_tokens=8, temperature=0.0, extra_body=extra,
            )
            return response, time.perf_counter() - started

        ask(None)  # warm-up: first-request overheads are not pruning's business
        rows, panels = [], []
        full_tokens = None
        for budget in args.budgets:
            logged = len(selection_log.read_text().splitlines())
            response, seconds = ask(budget)
            new_records = [json.loads(line) for line in selection_log.read_text().splitlines()[logged:]]
            kept = new_records[-1]["kept_positions"] if new_records else None
            prompt_tokens = response.usage.prompt_tokens
            full_tokens = full_tokens or (prompt_tokens if budget is None else None)
            visual = GRID * GRID if kept is None else len(kept)
            rows.append({
                "budget": "none" if budget is None else budget, "prompt_tokens": prompt_tokens,
                "visual_tokens_kept": visual, "pruned_percent": round(100 * (1 - visual / (GRID * GRID)), 1),
                "latency_s": round(seconds, 3), "answer": response.choices[0].message.content,
            })
            panels.append(draw_kept(image, kept, f"budget {rows[-1]['budget']}: {visual} tokens kept"))

    print()
    print(f"question: {args.question!r}   selector: {args.selector}")
    print(f"| {'budget':>6} | {'prompt tokens':>13} | {'visual kept':>11} | {'pruned':>6} | {'latency s':>9} | answer")
    print(f"|{'-' * 8}|{'-' * 15}|{'-' * 13}|{'-' * 8}|{'-' * 11}|--------")
    for row in rows:
        print(f"| {row['budget']!s:>6} | {row['prompt_tokens']:>13} | {row['visual_tokens_kept']:>11} | "
              f"{row['pruned_percent']:>5}% | {row['latency_s']:>9} | {row['answer']!r}")
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 8
    picture = workdir / "kept_patches.png"
    sheet.save(picture)
    (workdir / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nkept patches per budget: {picture}\nresults: {workdir / 'results.json'}")
    print("(random weights: the answers are noise; the point is the token counts and the kept patches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
