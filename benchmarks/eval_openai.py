"""Accuracy under visual-token budgets: run a VQA set against any OpenAI-compatible endpoint.

Every sample is asked once per *setting*: no pruning (budget ``none``) and every (budget, selector) pair.
The budget and the selector travel as top-level request fields, ``visual_token_budget`` and
``visual_token_selector`` (the OpenAI SDK's ``extra_body``), which the plugin's middleware reads. Answers are
scored by exact match after normalisation (lower case, punctuation and articles removed, number words as
digits, a leading yes/no taken as the answer), and the table gives each setting's accuracy and its accuracy
relative to no pruning, in % (the paper's "retention"), with the mean ``usage.prompt_tokens`` per request
and the latency.

``resolution`` is a baseline that may stand among the selectors: instead of pruning, the image is *down-scaled* on
the client to the largest size whose prompt holds no more tokens than the same image at budget K (both counted by
the server's own ``/tokenize``, so image markers and every family's resize rules count alike), and sent without a
budget -- the same number of visual tokens, obtained by lowering the resolution. Where the image's size does not
decide its token count but the model has its own resolution option (Gemma 4 resizes every image to its
``max_soft_tokens``), the largest of that option's values whose prompt fits is sent instead (as
``mm_processor_kwargs``, which the plugin admits up to the server's own value): Gemma 4 at 280 soft tokens
compares with budgets 140 and 70 exactly. Families whose count follows the size: Qwen2.5-VL, Qwen3-VL / Qwen3.5,
InternVL's tiles, the LLaVA-NeXT / OneVision tiles; where neither way reaches the budget (LLaVA-1.5's fixed 576),
the requests are reported as errors saying so.

Datasets: ``easy-vqa`` (the ``easy-vqa`` PyPI package: 64 px synthetic shapes, answers such as "circle",
"red", "yes"; ``--split test`` by default) or a JSONL file with one ``{"image": path_or_url, "question": ...,
"answer": ...}`` object per line (``answer`` may be a list of accepted answers; a relative image path is
relative to the JSONL file).

    python benchmarks/eval_openai.py --base-url http://localhost:8000/v1 --model llava-hf/llava-1.5-7b-hf \\
        --dataset easy-vqa --budgets none,192,128,64 --selectors textscythe,divprune,resolution --max-samples 500

Prints the Markdown table and writes JSON (``--out``, default benchmarks/results/eval_openai.json), the table
next to it (``.md``) and a plot of accuracy against the budget (``.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import mimetypes
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:  # the shared report writer, also when this file is loaded by path
    sys.path.insert(0, str(BENCHMARKS_DIR))

from _report import REPO_ROOT, pyplot, save_figure, show, write_report  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "eval_openai.json"
DEFAULT_PROMPT_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA's short-answer prompt
NO_BUDGET = "none"
#: The baseline that lowers the resolution instead of pruning (not a selector of the plugin).
RESOLUTION = "resolution"
#: The smallest long side (px) the resolution baseline tries.
MIN_SIDE = 28
#: Models' own resolution options the baseline tries, largest value first, when the image size does not decide the
#: token count (a server that does not admit a value answers 400, and the next is tried).
RESOLUTION_OPTIONS: dict[str, tuple[int, ...]] = {"max_soft_tokens": (1120, 560, 280, 140, 70)}  # Gemma 4


# ------------------------------------------------------------------------------------------------ scoring
_NUMBER_WORDS = {
    word: str(value) for value, word in enumerate((
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
    ))
}
_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "false", "incorrect"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case; punctuation and articles removed; number words as digits (``2.0`` -> ``2``); a leading
    yes/no (or a synonym such as "yeah", "true") stands for the whole answer ("Yes, it is." -> ``yes``)."""
    text = text.strip().lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(\d+)\.0+\b", r"\1", text)  # 2.0 -> 2
    words = [w for w in _PUNCTUATION.sub(" ", text).split() if w not in _ARTICLES]
    words = [_NUMBER_WORDS.get(w, w) for w in words]
    if words and words[0] in _YES:
        return "yes"
    if words and words[0] in _NO:
        return "no"
    return " ".join(words)


def is_correct(prediction: str, answers: list[str]) -> bool:
    """Exact match after :func:`normalize_answer` against any accepted answer."""
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in answers)


# ----------------------------------------------------------------------------------------------- datasets
@dataclass
class Sample:
    image: str  # a local path, an http(s) URL or a data: URL
    question: str
    answers: list[str]


def load_easy_vqa(split: str) -> list[Sample]:
    try:
        import easy_vqa
    except ImportError:
        raise SystemExit("the easy-vqa dataset needs the `easy-vqa` package: pip install easy-vqa") from None
    if split == "train":
        (questions, answers, image_ids), paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    else:
        (questions, answers, image_ids), paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    return [Sample(paths[i], q, [a]) for q, a, i in zip(questions, answers, image_ids, strict=True)]


def load_jsonl(path: Path) -> list[Sample]:
    samples = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, question, answer = record["image"], record["question"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: expected {{image, question, answer}}: {error}") from None
            if not re.match(r"^(https?|data):", image) and not os.path.isabs(image):
                image = str(path.parent / image)
            samples.append(Sample(image, question, [answer] if isinstance(answer, str) else list(answer)))
    return samples


def load_dataset(name: str, split: str) -> list[Sample]:
    if name == "easy-vqa":
        return load_easy_vqa(split)
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--dataset must be 'easy-vqa' or a JSONL file, got {name!r}")
    return load_jsonl(path)


def image_url(image: str) -> str:
    if re.match(r"^(https?|data):", image):
        return image
    mime = mimetypes.guess_type(image)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(image).read_bytes()).decode()


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    budget: int | None  # None: no pruning
    selector: str | None

    @property
    def name(self) -> str:
        return NO_BUDGET if self.budget is None else f"{self.selector}@{self.budget}"

    def extra_body(self) -> dict[str, object]:
        if self.budget is None or self.selector == RESOLUTION:
            return {}
        return {"visual_token_budget": self.budget, "visual_token_selector": self.selector}


def parse_budgets(text: str) -> list[int | None]:
    budgets: list[int | None] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item.lower() == NO_BUDGET:
            budgets.append(None)
            continue
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budgets are 'none' or integers >= 1, got {item!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"budgets must be >= 1, got {value}")
        budgets.append(value)
    if not budgets:
        raise argparse.ArgumentTypeError("no budgets given")
    return list(dict.fromkeys(budgets))


def parse_names(text: str) -> list[str]:
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError("no selectors given")
    return names


def settings_for(budgets: list[int | None], selectors: list[str]) -> list[Setting]:
    settings = [Setting(None, None)] if None in budgets else []
    for budget in sorted((b for b in budgets if b is not None), reverse=True):
        settings += [Setting(budget, selector) for selector in selectors]
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                        help="OpenAI-compatible base URL (default http://127.0.0.1:8000/v1; /v1 is appended if missing)")
    parser.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                        help="API key (default $OPENAI_API_KEY or 'EMPTY')")
    parser.add_argument("--dataset", default="easy-vqa", help="'easy-vqa' (default) or a JSONL file")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="easy-vqa split (default test)")
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets("none,192,128,64"),
                        help="comma list of budgets, 'none' = no pruning (default none,192,128,64)")
    parser.add_argument("--selectors", type=parse_names, default=["textscythe"],
                        help="comma list of selectors (default textscythe)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples after shuffling")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the dataset order")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens per answer (default 16)")
    parser.add_argument("--prompt-suffix", default=DEFAULT_PROMPT_SUFFIX,
                        help=f"appended to every question (default {DEFAULT_PROMPT_SUFFIX!r}; '' for none)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    parser.add_argument("--retries", type=int, default=2, help="retries per request (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--predictions", type=Path, default=None, help="also write every prediction (JSONL)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    if not args.base_url.endswith("/v1"):
        args.base_url += "/v1"
    if args.concurrency < 1 or (args.max_samples is not None and args.max_samples < 1) or args.max_tokens < 1:
        parser.error("--concurrency, --max-samples and --max-tokens must be >= 1")
    known = known_selectors()
    unknown = [name for name in args.selectors if known is not None and name not in (*known, RESOLUTION)]
    if unknown:
        parser.error(f"unknown selectors {unknown}; available: {[*known, RESOLUTION]}")
    return args


def known_selectors() -> list[str] | None:
    """The plugin's selector names when it is importable here (the client may run without it: then the
    server validates the names and answers 400 for an unknown one)."""
    try:
        from textscythe_vllm.selectors import available_selectors
    except ImportError:
        return None
    return available_selectors()


# ----------------------------------------------------------------------------------------------- requests
@dataclass
class Outcome:
    setting: str
    index: int
    prediction: str | None
    correct: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float
    error: str | None = None


def build_messages(sample: Sample, url: str, suffix: str) -> list[dict[str, object]]:
    text = sample.question if not suffix else f"{sample.question}\n{suffix}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@dataclass(frozen=True)
class Lowered:
    """What one sample sends under a setting: its image URL and the model options (``mm_processor_kwargs``)."""

    url: str
    options: dict[str, object] = field(default_factory=dict)


async def ask(client, args: argparse.Namespace, setting: Setting, index: int, sample: Sample, request: Lowered,
              gate: asyncio.Semaphore) -> Outcome:
    messages = build_messages(sample, request.url, args.prompt_suffix)
    extra_body = {**setting.extra_body(), **({"mm_processor_kwargs": request.options} if request.options else {})}
    async with gate:
        started = time.perf_counter()
        try:
            response = await client.chat.completions.create(
                model=args.model, messages=messages, max_tokens=args.max_tokens, temperature=0.0,
                extra_body=extra_body or None,
            )
        except Exception as error:  # counted as wrong and reported; the run goes on
            return Outcome(setting.name, index, None, False, None, None, time.perf_counter() - started,
                           f"{type(error).__name__}: {error}"[:500])
        seconds = time.perf_counter() - started
    prediction = response.choices[0].message.content or ""
    usage = response.usage
    return Outcome(setting.name, index, prediction, is_correct(prediction, sample.answers),
                   None if usage is None else usage.prompt_tokens,
                   None if usage is None else usage.completion_tokens, seconds)


class ResolutionUnreachable(RuntimeError):
    pass


def load_image(image: str) -> Any:
    """The sample's picture as an RGB PIL image (a path, an http(s) URL or a data: URL)."""
    import io
    import urllib.request

    from PIL import Image

    if image.startswith("data:"):
        data = base64.b64decode(image.split(",", 1)[1])
    elif re.match(r"^https?:", image):
        with urllib.request.urlopen(image, timeout=60) as response:
            data = response.read()
    else:
        data = Path(image).read_bytes()
    return Image.open(io.BytesIO(data)).convert("RGB")


def png_url(picture: Any) -> str:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def prompt_tokens(http, args: argparse.Namespace, messages: list[dict[str, object]],
                        budget: int | None = None, options: dict[str, object] | None = None) -> int | None:
    """The server's own count of the chat prompt (``POST /tokenize``), at ``budget`` and with the model
    ``options`` when given; ``None`` when the server refuses an option's value (a 400 naming it)."""
    body: dict[str, object] = {"model": args.model, "messages": messages}
    if budget is not None:
        body["visual_token_budget"] = budget
    if options:
        body["mm_processor_kwargs"] = options
    response = await http.post(f"{args.base_url.removesuffix('/v1')}/tokenize", json=body,
                               headers={"Authorization": f"Bearer {args.api_key}"})
    if options and response.status_code == 400 and any(key in response.text for key in options):
        return None
    response.raise_for_status()
    return int(response.json()["count"])


async def resolution_request(http, args: argparse.Namespace, sample: Sample, budget: int) -> Lowered:
    """The sample's image down-scaled (aspect kept) to the largest long side whose prompt has no more tokens than
    the original image's at ``budget``: the same number of visual tokens by lowering the resolution. Where the size
    does not drive the count, or no size gets there, the original image with the largest value of a model's own
    resolution option (:data:`RESOLUTION_OPTIONS`) whose prompt does."""
    picture = load_image(sample.image)

    def scaled(side: int) -> Any:
        factor = side / max(picture.size)
        return picture.resize((max(1, round(picture.width * factor)), max(1, round(picture.height * factor))))

    async def tokens_at(side: int) -> int:
        return await prompt_tokens(http, args, build_messages(sample, png_url(scaled(side)), args.prompt_suffix))

    original = build_messages(sample, png_url(picture), args.prompt_suffix)
    target = await prompt_tokens(http, args, original, budget)
    longest = max(picture.size)
    full = await tokens_at(longest)
    if full <= target:
        return Lowered(png_url(picture))
    # The size drives the count where halving the image's sides removes at least half its visual tokens. Gemma 4
    # resizes every image to its max_soft_tokens, where a smaller image of the same aspect counts about the same
    # (rounding moves it a few tokens either way): a bisection there would send a thumbnail the server blows up.
    visual = full - target + budget
    halved = await tokens_at(max(MIN_SIDE, longest // 2))
    if halved <= full - visual // 2 and await tokens_at(MIN_SIDE) <= target:
        low, high = MIN_SIDE, longest  # invariant: tokens_at(low) <= target < tokens_at(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if await tokens_at(middle) <= target else (low, middle)
        return Lowered(png_url(scaled(low)))
    for key, values in RESOLUTION_OPTIONS.items():
        for value in values:
            tokens = await prompt_tokens(http, args, original, options={key: value})
            if tokens is not None and tokens <= target:
                return Lowered(png_url(picture), {key: value})
    raise ResolutionUnreachable(
        f"no image size (down to {MIN_SIDE} px) and no value of {', '.join(RESOLUTION_OPTIONS)} the server admits "
        f"gives {args.model} no more than {target} prompt tokens: its token count does not follow the resolution")


async def evaluate(args: argparse.Namespace, samples: list[Sample], settings: list[Setting]) -> list[Outcome]:
    import openai

    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout,
                                max_retries=args.retries)
    try:
        if args.model is None:
            models = await client.models.list()
            args.model = models.data[0].id
        gate = asyncio.Semaphore(args.concurrency)
        originals = [Lowered(image_url(sample.image)) for sample in samples]
        outcomes: list[Outcome] = []
        for setting in settings:  # one setting at a time: latencies are not mixed across settings
            requests: list[Lowered | BaseException] = list(originals)
            if setting.selector == RESOLUTION:
                requests = await resolution_requests(args, samples, setting.budget, gate)
            started = time.perf_counter()
            tasks = [ask(client, args, setting, i, s, request, gate)
                     if isinstance(request, Lowered) else failed(setting, i, request)
                     for (i, s), request in zip(enumerate(samples), requests, strict=True)]
            done = await asyncio.gather(*tasks)
            outcomes += done
            accuracy = 100 * sum(o.correct for o in done) / len(done)
            errors = sum(o.error is not None for o in done)
            print(f"  {setting.name:24s} accuracy {accuracy:6.2f}%  errors {errors}  "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    finally:
        await client.close()
    return outcomes


async def resolution_requests(args: argparse.Namespace, samples: list[Sample], budget: int,
                              gate: asyncio.Semaphore) -> list[Lowered | BaseException]:
    """Per sample: its image at the lower resolution (:func:`resolution_request`), or why there is none."""
    import httpx

    async with httpx.AsyncClient(timeout=args.timeout) as http:
        async def one(sample: Sample) -> Lowered:
            async with gate:
                return await resolution_request(http, args, sample, budget)

        return list(await asyncio.gather(*(one(sample) for sample in samples), return_exceptions=True))


async def failed(setting: Setting, index: int, error: BaseException) -> Outcome:
    return Outcome(setting.name, index, None, False, None, None, 0.0, f"{type(error).__name__}: {error}"[:500])


# ---------------------------------------------------------------------------------------------- reporting
def summarize(outcomes: list[Outcome], settings: list[Setting], images_per_sample: float) -> list[dict[str, object]]:
    rows = []
    for setting in settings:
        mine = [o for o in outcomes if o.setting == setting.name]
        answered = [o for o in mine if o.error is None]
        prompt = [o.prompt_tokens for o in answered if o.prompt_tokens is not None]
        completion = [o.completion_tokens for o in answered if o.completion_tokens is not None]
        latency = [o.seconds for o in answered]
        rows.append({
            "setting": setting.name, "budget": setting.budget, "selector": setting.selector,
            "samples": len(mine), "errors": len(mine) - len(answered),
            "accuracy": 100 * sum(o.correct for o in mine) / len(mine) if mine else None,
            "mean_prompt_tokens": statistics.fmean(prompt) if prompt else None,
            "mean_completion_tokens": statistics.fmean(completion) if completion else None,
            "mean_latency_s": statistics.fmean(latency) if latency else None,
            "p50_latency_s": statistics.median(latency) if latency else None,
        })
    baseline = next((r for r in rows if r["budget"] is None), None)
    for row in rows:
        base_accuracy = None if baseline is None else baseline["accuracy"]
        row["relative_accuracy"] = (100 * row["accuracy"] / base_accuracy) if base_accuracy else None
        row["prompt_tokens_saved"] = None
        row["visual_tokens_per_image"] = None
        if baseline and baseline["mean_prompt_tokens"] is not None and row["mean_prompt_tokens"] is not None:
            saved = baseline["mean_prompt_tokens"] - row["mean_prompt_tokens"]
            row["prompt_tokens_saved"] = saved
            if row["budget"] is not None:  # N = K + (tokens saved per image)
                row["visual_tokens_per_image"] = row["budget"] + saved / images_per_sample
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown_table(report: dict[str, object]) -> str:
    """The paper's layout: the unpruned row, then one block per budget with accuracy and % of unpruned."""
    rows = report["settings"]
    lines = [
        "| visual tokens | method | accuracy (%) | relative (%) | prompt tokens | mean latency (s) | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["budget"] is None:
            label, method = "all (no pruning)", "vanilla"
        else:
            n = row["visual_tokens_per_image"]
            reduction = f" (↓{100 * (1 - row['budget'] / n):.1f}%)" if n and n > row["budget"] else ""
            label, method = f"retain {row['budget']}{reduction}", row["selector"]
        lines.append(
            f"| {label} | {method} | {_cell(row['accuracy'], '.2f')} | {_cell(row['relative_accuracy'], '.1f')} "
            f"| {_cell(row['mean_prompt_tokens'], '.1f')} | {_cell(row['mean_latency_s'], '.3f')} "
            f"| {row['errors']} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, object], path: Path) -> None:
    plt = pyplot()
    rows = report["settings"]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for selector in report["config"]["selectors"]:
        points = sorted((r["budget"], r["accuracy"]) for r in rows if r["selector"] == selector)
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=selector)
    baseline = next((r for r in rows if r["budget"] is None), None)
    if baseline is not None:
        axis.axhline(baseline["accuracy"], color="black", linestyle="--", linewidth=1, label="no pruning")
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    if budgets:
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.minorticks_off()
    axis.set_xlabel("visual token budget per image")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(f"{report['config']['dataset']} ({report['config']['samples']} samples), "
                   f"{report['config']['model']}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def run(args: argparse.Namespace) -> dict[str, object]:
    samples = load_dataset(args.dataset, args.split)
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(samples)
    if args.max_samples is not None:
        samples = samples[: args.max_samples]
    if not samples:
        raise SystemExit("the dataset is empty")
    settings = settings_for(args.budgets, args.selectors)
    started = time.perf_counter()
    outcomes = asyncio.run(evaluate(args, samples, settings))
    rows = summarize(outcomes, settings, images_per_sample=1.0)
    by_sample: dict[int, dict[str, str | None]] = {}
    for outcome in outcomes:
        by_sample.setdefault(outcome.index, {})[outcome.setting] = outcome.prediction
    if args.predictions is not None:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        with open(args.predictions, "w") as out:
            for outcome in outcomes:
                sample = samples[outcome.index]
                out.write(json.dumps({"setting": outcome.setting, "index": outcome.index, "question": sample.question,
                                      "answers": sample.answers, "prediction": outcome.prediction,
                                      "correct": outcome.correct, "prompt_tokens": outcome.prompt_tokens,
                                      "error": outcome.error}) + "\n")
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "config": {
            "base_url": args.base_url, "model": args.model, "dataset": args.dataset,
            "split": args.split if args.dataset == "easy-vqa" else None, "samples": len(samples),
            "budgets": [NO_BUDGET if b is None else b for b in args.budgets], "selectors": args.selectors,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "prompt_suffix": args.prompt_suffix,
            "seed": None if args.no_shuffle else args.seed, "scoring": "exact match after normalisation",
        },
        "wall_seconds": time.perf_counter() - started,
        "settings": rows,
        "first_errors": errors[:5],
        "examples": [
            {"question": samples[i].question, "answers": samples[i].answers, "predictions": by_sample.get(i, {})}
            for i in range(min(10, len(samples)))
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    table = markdown_table(report)
    config = report["config"]
    header = (f"{config['dataset']}: {config['samples']} samples, model {config['model']} at {config['base_url']}, "
              f"exact match after normalisation; relative = accuracy / accuracy without pruning")
    show(header, table)
    write_report(args.out, report, header, table, None if args.no_plot else plot, ensure_ascii=False)
    failed = sum(r["errors"] for r in report["settings"])
    if failed == sum(r["samples"] for r in report["settings"]):
        print(f"every request failed, e.g. {report['first_errors'][:1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
