"""Load generation and server-process inspection for the reliability tests and ``benchmarks/load.py``.

* :class:`RequestSpec` / :func:`request_mix`: a deterministic mix of chat requests (images x questions x
  budgets x selectors, streamed or not) where the same image is asked different questions at the same time.
* :func:`run_requests`: send specs through ``openai.AsyncOpenAI`` with bounded concurrency; every outcome is
  recorded (content, prompt tokens, latency, or the error), nothing raises.
* :func:`process_group` / :func:`rss_kib`: the ``vllm serve`` process tree (API server, engine core, workers: the
  server is started in its own session, so they share its process group) and their resident memory, read
  from ``/proc``.
* :func:`metric_samples` / :func:`metric_values` / :func:`metric_sum`: a Prometheus text exposition, parsed by
  ``prometheus_client.parser`` (the repository's one parser: the tests and ``benchmarks/serving.py``).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from textscythe_dev.images import scene, user_message

QUESTIONS = (
    "what colour is the umbrella next to the red car ?",
    "is there a dog on the grass ?",
    "how many people are standing near the bus ?",
)
BUDGETS = (None, 1, 32, 64, 192, 576, 1000)
SELECTORS = ("textscythe", "divprune", "visionzip", "random", "dart", "cls_attention")


@dataclass(frozen=True)
class RequestSpec:
    """One chat request: ``image`` indexes the image list, ``question`` :data:`QUESTIONS`."""

    image: int
    question: int
    budget: int | None
    selector: str | None
    stream: bool = False

    def key(self) -> tuple[int, int, int | None, str | None]:
        """What determines the greedy answer (streaming does not)."""
        return (self.image, self.question, self.budget, self.selector)

    def extra_body(self) -> dict[str, Any] | None:
        body: dict[str, Any] = {}
        if self.budget is not None:
            body["visual_token_budget"] = self.budget
        if self.selector is not None:
            body["visual_token_selector"] = self.selector
        return body or None


@dataclass
class Outcome:
    spec: RequestSpec
    content: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0
    error: str | None = None


def distinct_specs(num_images: int = 3, seed: int = 0) -> list[RequestSpec]:
    """Every budget x selector pairing once (``None`` budget once per image and question), spread over images and
    questions so that each image is asked every question."""
    rng = random.Random(seed)
    specs = {RequestSpec(image, question, None, None) for image in range(num_images) for question in range(len(QUESTIONS))}
    slot = 0
    for budget in BUDGETS[1:]:
        for selector in SELECTORS:
            specs.add(RequestSpec(slot % num_images, (slot // num_images + rng.randrange(2)) % len(QUESTIONS),
                                  budget, selector))
            slot += 1
    return sorted(specs, key=lambda spec: (spec.image, spec.question, spec.budget or 0, spec.selector or ""))


def request_mix(total: int, distinct: Sequence[RequestSpec], seed: int = 0) -> list[RequestSpec]:
    """``total`` requests cycling through ``distinct``, shuffled, half of them streamed."""
    rng = random.Random(seed)
    mix = [distinct[index % len(distinct)] for index in range(total)]
    rng.shuffle(mix)
    return [RequestSpec(s.image, s.question, s.budget, s.selector, stream=rng.random() < 0.5) for s in mix]


def default_images(count: int = 3) -> list[dict[str, Any]]:
    """``count`` different scenes, as the OpenAI ``image_url`` parts of :func:`user_message` (encoded once)."""
    return [user_message("", scene(200 + index))["content"][0] for index in range(count)]  # type: ignore[index]


def messages_for(spec: RequestSpec, images: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [images[spec.image], {"type": "text", "text": QUESTIONS[spec.question]}]}]


async def run_one(client: Any, model: str, spec: RequestSpec, images: Sequence[dict[str, Any]],
                  max_tokens: int = 6) -> Outcome:
    outcome = Outcome(spec)
    started = time.perf_counter()
    try:
        common = dict(model=model, messages=messages_for(spec, images), max_tokens=max_tokens, temperature=0.0,
                      extra_body=spec.extra_body())
        if spec.stream:
            stream = await client.chat.completions.create(
                **common, stream=True, stream_options={"include_usage": True}
            )
            parts = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    outcome.prompt_tokens = chunk.usage.prompt_tokens
                    outcome.completion_tokens = chunk.usage.completion_tokens
            outcome.content = "".join(parts)
        else:
            response = await client.chat.completions.create(**common)
            outcome.content = response.choices[0].message.content or ""
            outcome.prompt_tokens = response.usage.prompt_tokens
            outcome.completion_tokens = response.usage.completion_tokens
    except Exception as error:  # recorded, never raised: the load test counts errors
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.latency_s = time.perf_counter() - started
    return outcome


async def run_requests(client: Any, model: str, specs: Sequence[RequestSpec], images: Sequence[dict[str, Any]],
                       concurrency: int, max_tokens: int = 6) -> list[Outcome]:
    """All ``specs`` with at most ``concurrency`` in flight; outcomes in the order of ``specs``."""
    gate = asyncio.Semaphore(concurrency)

    async def limited(spec: RequestSpec) -> Outcome:
        async with gate:
            return await run_one(client, model, spec, images, max_tokens)

    return list(await asyncio.gather(*(limited(spec) for spec in specs)))


def mismatches(outcomes: Iterable[Outcome], solo: dict[tuple, Outcome]) -> list[str]:
    """Outcomes whose content or prompt tokens differ from the solo run of the same request."""
    problems = []
    for outcome in outcomes:
        reference = solo[outcome.spec.key()]
        got, want = (outcome.content, outcome.prompt_tokens), (reference.content, reference.prompt_tokens)
        if got != want:
            problems.append(f"{outcome.spec}: concurrent {got!r} != solo {want!r}")
    return problems


def latency_summary(outcomes: Sequence[Outcome]) -> dict[str, float]:
    latencies = sorted(outcome.latency_s for outcome in outcomes if outcome.error is None)
    if not latencies:
        return {"p50_s": float("nan"), "p95_s": float("nan"), "max_s": float("nan")}
    return {
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "max_s": latencies[-1],
    }


# --- processes -------------------------------------------------------------------------------------------
def process_group(pgid: int) -> list[int]:
    """PIDs of the live processes in process group ``pgid`` (``/proc/<pid>/stat`` field 5), sorted."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state ppid pgrp ...; zombies (state Z) have exited
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return sorted(members)


def rss_kib(pid: int) -> int:
    """``VmRSS`` of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_name(pid: int) -> str:
    """``/proc/<pid>/comm`` (vLLM names its processes, e.g. ``VLLM::EngineCore``), or ``"?"``."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def group_rss_by_process_mib(pgid: int) -> dict[str, float]:
    """Resident memory per process of the group, MiB, keyed ``"<pid> <name>"``."""
    return {f"{pid} {process_name(pid)}": round(rss_kib(pid) / 1024, 1) for pid in process_group(pgid)}


def group_rss_mib(pgid: int) -> float:
    """Summed resident memory of the process group, MiB (shared pages count once per process)."""
    return sum(rss_kib(pid) for pid in process_group(pgid)) / 1024


@dataclass
class RssSample:
    label: str
    mib: float
    per_process_mib: dict[int, float] = field(default_factory=dict)


def sample_rss(pgid: int, label: str) -> RssSample:
    per = {pid: rss_kib(pid) / 1024 for pid in process_group(pgid)}
    return RssSample(label, sum(per.values()), per)


# --- Prometheus text ----------------------------------------------------------------------------------------


Sample = tuple[str, dict[str, str], float]  # (sample name, labels, value)


def metric_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition as ``(name, labels, value)``, parsed by
    ``prometheus_client.parser`` (the one parser; counters' samples carry their ``_total`` suffix). Parse a
    scrape once and pass the samples to :func:`metric_values` / :func:`metric_sum` to read it many times."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(sample.name, dict(sample.labels), float(sample.value)) for family in text_string_to_metric_families(text)
            for sample in family.samples]


def metric_values(exposition: str | Sequence[Sample], name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample named ``name`` in a Prometheus text exposition, or in its
    :func:`metric_samples`."""
    samples = metric_samples(exposition) if isinstance(exposition, str) else exposition
    return [(labels, value) for sample_name, labels, value in samples if sample_name == name]


def metric_sum(exposition: str | Sequence[Sample], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (text or :func:`metric_samples`)."""
    return sum(value for sample_labels, value in metric_values(exposition, name)
               if all(sample_labels.get(key) == wanted for key, wanted in labels.items()))


def outcome_dicts(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    return [asdict(outcome) for outcome in outcomes]
