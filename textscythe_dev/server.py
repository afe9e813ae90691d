"""Start a real ``vllm serve`` subprocess with the plugin, for tests, the demo and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

MIDDLEWARE = "textscythe_vllm.middleware.VisualTokenBudgetMiddleware"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_test_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for vLLM on a small CPU machine: 1 GiB KV cache, both cores for the worker."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def vllm_executable() -> str:
    candidate = Path(sys.executable).with_name("vllm")
    return str(candidate) if candidate.exists() else (shutil.which("vllm") or "vllm")


class VLLMServer:
    """``with VLLMServer(model_dir, ["--load-format", "dummy"]) as server: server.base_url``.

    Starts ``vllm serve`` with the plugin's middleware and ``--trust-request-mm-kwargs``, waits for
    ``/health``, and stops the whole process group on exit. The log goes to ``log_path``.
    """

    def __init__(
        self,
        model: str | Path,
        extra_args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 420.0,
        with_middleware: bool = True,
        served_model_name: str = "tiny-llava",
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_name = served_model_name
        args = [
            vllm_executable(), "serve", str(model),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", served_model_name,
            "--enforce-eager", "--max-model-len", "4096",
        ]
        if with_middleware:
            args += ["--middleware", MIDDLEWARE, "--trust-request-mm-kwargs"]
        self.args = [*args, *extra_args]
        self.env = cpu_test_env(env)
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/textscythe-vllm-{self.port}.log")
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.healthy()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        finally:
            self.process = None


@dataclass(frozen=True)
class Served:
    """What a test module serves, declared once as its module-level ``SERVED``; ``tests/conftest.py``'s
    module-scoped ``server`` and ``client`` fixtures start it and connect the ``openai`` SDK to it.

    ``model``: the name of the fixture giving the model directory. ``env_fixture``: the name of a fixture giving
    extra environment variables (e.g. a selection-log path), or None. ``api_key``: what the client sends (pass
    ``--api-key`` in ``args`` for the server to require it).
    """

    model: str
    args: tuple[str, ...] = ()
    name: str = "tiny-llava"
    env_fixture: str | None = None
    api_key: str = "unused"
    timeout: float = 180.0


def chat(client: Any, model: str | VLLMServer, messages: list[dict[str, Any]], budget: int | None = None,
         max_tokens: int = 3, *, logprobs: bool = False, **extra_body: Any) -> Any:
    """A greedy chat completion with an optional ``visual_token_budget`` (and any other body fields), to a model
    name or a :class:`VLLMServer`'s model."""
    if budget is not None:
        extra_body["visual_token_budget"] = budget
    return client.chat.completions.create(
        model=getattr(model, "model_name", model), messages=messages, max_tokens=max_tokens, temperature=0.0,
        logprobs=logprobs, extra_body=extra_body or None,
    )


def prompt_tokens(client: Any, server: VLLMServer, messages: list[dict[str, Any]], budget: int | None = None,
                  **extra_body: Any) -> int:
    """``usage.prompt_tokens`` of a short :func:`chat` to ``server``, with an optional budget and body fields."""
    return chat(client, server, messages, budget, **extra_body).usage.prompt_tokens


def assert_budget_prunes_each_item(client: Any, server: VLLMServer, messages: list[dict[str, Any]],
                                   item_tokens: Sequence[int], budgets: Sequence[int], **extra_body: Any) -> int:
    """Under each of ``budgets``, every visual item of ``messages`` (``item_tokens`` placeholders each, unpruned)
    keeps exactly ``min(budget, its tokens)``: the prompt is shorter than without a budget by exactly what was
    pruned. ``extra_body`` goes with the budgeted requests only. Returns the prompt tokens without a budget."""
    full = prompt_tokens(client, server, messages)
    for budget in budgets:
        pruned = sum(tokens - min(budget, tokens) for tokens in item_tokens)
        assert prompt_tokens(client, server, messages, budget, **extra_body) == full - pruned, (budget, extra_body)
    return full


#: ``(field, value)`` pairs every family's server must refuse with HTTP 400 naming the field.
BAD_VALUES = [("visual_token_budget", 0), ("visual_token_budget", -3), ("visual_token_budget", 1.5),
              ("visual_token_budget", "64"), ("visual_token_budget", True), ("visual_token_selector", "nope")]


def assert_refused(client: Any, server: VLLMServer, messages: list[dict[str, Any]], field: str, value: Any) -> None:
    """A chat request with ``field: value`` (and a valid budget when the field is the selector) is answered 400
    naming the field, and the server stays up."""
    import openai
    import pytest

    body = {field: value}
    if field == "visual_token_selector":
        body["visual_token_budget"] = 8
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=2, extra_body=body)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == field
    assert server.alive()


def token_counters(server: VLLMServer) -> tuple[float, float]:
    """``(textscythe_visual_tokens_before_total, ..._after_total)`` on the server's ``/metrics``, all labels."""
    from textscythe_dev.load import metric_sum

    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return (metric_sum(text, "textscythe_visual_tokens_before_total"),
            metric_sum(text, "textscythe_visual_tokens_after_total"))


def counted_visual_tokens(server: VLLMServer, send: Callable[[], object]) -> tuple[float, float]:
    """What ``send()`` adds to the server's :func:`token_counters`: ``(before pruning, after pruning)``."""
    before = token_counters(server)
    send()
    after = token_counters(server)
    return after[0] - before[0], after[1] - before[1]


#: ``(usage.prompt_tokens, [(token, logprob), ...])`` of a chat completion: what two servers must agree on.
Outputs = tuple[int, list[tuple[str, float]]]


def outputs_of(response: Any) -> Outputs:
    """The :data:`Outputs` of a chat completion asked for log-probabilities."""
    return response.usage.prompt_tokens, [(t.token, t.logprob) for t in response.choices[0].logprobs.content]


def greedy_with_logprobs(client: Any, model: str, messages: list[dict[str, Any]], max_tokens: int = 8,
                         **extra_body: Any) -> Outputs:
    """The :data:`Outputs` of a greedy chat completion."""
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, logprobs=True,
        extra_body=extra_body or None,
    )
    return outputs_of(response)


def stock_outputs(model: str | Path, extra_args: Sequence[str], conversations: Mapping[str, list[dict[str, Any]]],
                  log_path: str | Path, max_tokens: int = 8) -> dict[str, Outputs]:
    """Start *stock* ``vllm serve`` (``VLLM_PLUGINS=``, no middleware) on ``model`` and return
    :func:`greedy_with_logprobs` for every conversation; raises if the plugin loaded anyway."""
    import openai

    with VLLMServer(model, extra_args, env={"VLLM_PLUGINS": ""}, log_path=log_path, with_middleware=False,
                    served_model_name="stock") as stock:
        client = openai.OpenAI(base_url=f"{stock.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        outputs = {name: greedy_with_logprobs(client, stock.model_name, messages, max_tokens)
                   for name, messages in conversations.items()}
        if "visual token pruning enabled" in Path(log_path).read_text():
            raise RuntimeError("the plugin loaded in the stock server")
    return outputs


def assert_same_outputs(ours: Outputs, theirs: Outputs, logprob_tolerance: float = 1e-4) -> None:
    """Same prompt tokens, same greedy tokens, log-probabilities within ``logprob_tolerance``."""
    assert ours[0] == theirs[0], f"prompt tokens {ours[0]} != {theirs[0]}"
    assert [token for token, _ in ours[1]] == [token for token, _ in theirs[1]]
    for (_, mine), (_, stock) in zip(ours[1], theirs[1], strict=True):
        assert abs(mine - stock) <= logprob_tolerance, (mine, stock)


def assert_image_drives_outputs(one: Outputs, other: Outputs, logprob_tolerance: float = 1e-4,
                                factor: float = 10.0) -> None:
    """Two requests that differ only in their image give outputs that differ by far more than
    ``logprob_tolerance`` (a greedy token differs, or a log-probability by ``factor`` x the tolerance): the
    checkpoint's weights let the pixels drive the logits, so a comparison at that tolerance sees the features."""
    tokens_one, tokens_other = [token for token, _ in one[1]], [token for token, _ in other[1]]
    if tokens_one != tokens_other:
        return
    largest = max(abs(a - b) for (_, a), (_, b) in zip(one[1], other[1], strict=True))
    assert largest > factor * logprob_tolerance, (
        f"another image moved the log-probabilities by at most {largest:.2e}: the weights do not let the image "
        f"drive the logits, so a {logprob_tolerance} tolerance could hide a change to the features"
    )


def assert_no_budget_is_stock(
    client: Any, server: VLLMServer, model: str | Path, args: Sequence[str],
    conversations: Mapping[str, list[dict[str, Any]]], log_path: str | Path, *,
    other_media: Mapping[str, list[dict[str, Any]]] | None = None, pruned: Mapping[str, int] | None = None,
) -> dict[str, Outputs]:
    """Without a budget, every conversation gets from ``server`` what a stock ``vllm serve`` (``VLLM_PLUGINS=``,
    the same ``model`` and ``args``) gives: :func:`assert_same_outputs`. Returns ``server``'s outputs.

    Controls, so that the comparison could fail: ``other_media`` maps a conversation to the same question with
    another image or video, which must move ``server``'s outputs far more than the tolerance
    (:func:`assert_image_drives_outputs`); ``pruned`` maps a conversation to a budget under which ``server``'s
    outputs must differ from stock's."""
    import pytest

    ours = {name: greedy_with_logprobs(client, server.model_name, messages) for name, messages in conversations.items()}
    theirs = stock_outputs(model, args, conversations, log_path)
    for name in conversations:
        assert_same_outputs(ours[name], theirs[name])
    for name, messages in (other_media or {}).items():
        assert_image_drives_outputs(ours[name], greedy_with_logprobs(client, server.model_name, messages))
    for name, budget in (pruned or {}).items():
        pruned_outputs = greedy_with_logprobs(client, server.model_name, conversations[name],
                                              visual_token_budget=budget)
        with pytest.raises(AssertionError):
            assert_same_outputs(pruned_outputs, theirs[name])
    return ours


def assert_pruned_repeat_is_identical(client: Any, server: VLLMServer, messages: list[dict[str, Any]],
                                      other_image: list[dict[str, Any]], budget: int, cached_at_least: int) -> Any:
    """``messages`` sent twice with ``budget`` get identical outputs, the second time with at least
    ``cached_at_least`` prompt tokens from the prefix cache; ``other_image`` (the same request with another image)
    moves the outputs far more than the tolerance, so the check could fail. Returns the first response."""
    first = chat(client, server, messages, budget, max_tokens=6, logprobs=True)
    again = chat(client, server, messages, budget, max_tokens=6, logprobs=True)
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens >= cached_at_least  # pruned blocks come from the cache
    assert_same_outputs(outputs_of(again), outputs_of(first))
    other = chat(client, server, other_image, budget, max_tokens=6, logprobs=True)
    assert_image_drives_outputs(outputs_of(first), outputs_of(other))
    return first


def wait_until(predicate: Any, timeout: float, interval: float = 0.25) -> bool:
    """Poll ``predicate()`` until it holds or ``timeout`` seconds pass; returns its last value (tests wait for a
    condition, never for a fixed time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class EvalRun:
    """What one ``benchmarks/eval_openai.py`` run wrote: the report (at ``out``), its settings by name, every
    sample's prediction, what it printed, and every sample's ``usage.prompt_tokens`` by ``(setting, index)``."""

    report: dict[str, Any]
    rows: dict[str, dict[str, Any]]
    predictions: list[dict[str, Any]]
    stdout: str
    out: Path

    @property
    def prompt_tokens(self) -> dict[tuple[str, int], int]:
        return {(p["setting"], p["index"]): p["prompt_tokens"] for p in self.predictions}


def run_eval_openai(server: VLLMServer, workdir: Path, arguments: Sequence[str],
                    images: Sequence[Any] = (), question: str = "what colour is the car ?") -> EvalRun:
    """Run ``benchmarks/eval_openai.py`` against ``server`` with ``arguments`` (budgets, selectors, ...), on a
    JSONL set of ``images`` (PIL, each asked ``question``, answer "red") unless ``arguments`` name a dataset;
    asserts it exited 0."""
    import json

    workdir.mkdir(parents=True, exist_ok=True)
    dataset: list[str] = []
    if images:
        path = workdir / "set.jsonl"
        with open(path, "w") as lines:
            for index, image in enumerate(images):
                image.save(workdir / f"{index}.png")
                lines.write(json.dumps({"image": f"{index}.png", "question": question, "answer": "red"}) + "\n")
        dataset = ["--dataset", str(path)]
    out, predictions = workdir / "eval.json", workdir / "predictions.jsonl"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_openai.py"
    command = [sys.executable, str(script), "--base-url", f"{server.base_url}/v1", *dataset, *arguments,
               "--out", str(out), "--predictions", str(predictions)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    return EvalRun(report, {row["setting"]: row for row in report["settings"]},
                   [json.loads(line) for line in predictions.read_text().splitlines()], done.stdout, out)
