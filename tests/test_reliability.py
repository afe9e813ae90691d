"""Reliability under load and faults, against real ``vllm serve`` processes (one at a time).

* Version refusal: on an untested vLLM the plugin stops ``vllm serve`` at start-up with one message, no trace.
* Load (tiny LLaVA-1.5 with real random weights, float32, prefix caching, 16 concurrent sequences): hundreds of
  mixed requests -- budgets, selectors, questions, the same image asked different questions at once, streamed
  and not -- give zero errors, keep every server process alive (same PIDs), match the same request served
  alone token for token, and do not grow the server's memory.
* Client disconnects (mid-stream, and non-streaming client time-outs) abort the requests in the engine;
  nothing stays running and later requests are served normally.
* Selector failure (``TEXTSCYTHE_FAIL_SELECTION=1``): pruned requests complete with the pruned token count via
  the deterministic uniform fallback, counted by ``textscythe_selector_fallbacks_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request

import httpx
import openai
import pytest

from textscythe_dev import load
from textscythe_dev.images import scene, user_message
from textscythe_dev.server import VLLMServer, cpu_test_env, vllm_executable, wait_until

pytestmark = pytest.mark.server

IMAGE_TOKENS = 576
LOAD_REQUESTS = 480  # two equal halves
CONCURRENCY = 16
REFUSAL = "supports vLLM 0.32.x and 0.33.x only"


# --- version refusal (no server stays up) ---------------------------------------------------------------
def test_untested_vllm_version_refuses_vllm_serve_at_startup(tiny_llava_dir):
    env = cpu_test_env({"TEXTSCYTHE_VLLM_VERSION_OVERRIDE": "0.34.0"})
    done = subprocess.run(
        [vllm_executable(), "serve", str(tiny_llava_dir), "--load-format", "dummy", "--enforce-eager",
         "--port", "1", "--middleware", "textscythe_vllm.middleware.VisualTokenBudgetMiddleware"],
        capture_output=True, text=True, timeout=240, env=env, start_new_session=True,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert done.stderr.count(REFUSAL) == 1, output[-3000:]
    assert "vLLM 0.34.0 is installed" in done.stderr and "VLLM_PLUGINS=" in done.stderr
    assert "Traceback" not in output, output[-3000:]


def test_server_starts_and_prunes_when_the_gate_sees_vllm_0_33(tiny_llava_dir, tmp_path):
    """0.33.x is admitted (its plugin-facing modules are identical to 0.32's; no CPU wheel of it exists to run)."""
    with VLLMServer(tiny_llava_dir, ["--load-format", "dummy"], log_path=tmp_path / "vllm-0.33.log",
                    env={"TEXTSCYTHE_VLLM_VERSION_OVERRIDE": "0.33.0"}) as server:
        assert_prunes_exactly(server, scene(420), 16)
    assert "visual token pruning enabled" in (tmp_path / "vllm-0.33.log").read_text()


def test_untested_vllm_version_refuses_plugin_loading():
    script = (
        "import vllm\n"
        "vllm.__version__ = '0.31.0'\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "print('plugins loaded')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env=cpu_test_env())
    assert done.returncode == 1
    assert done.stderr.count(REFUSAL) == 1 and "plugins loaded" not in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


# --- helpers ---------------------------------------------------------------------------------------------
def scrape(server: VLLMServer) -> str:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as response:
        return response.read().decode()


def in_engine(server: VLLMServer) -> float:
    """Requests the engine holds (running + waiting)."""
    text = scrape(server)
    return load.metric_sum(text, "vllm:num_requests_running") + load.metric_sum(text, "vllm:num_requests_waiting")


def assert_prunes_exactly(server: VLLMServer, image, budget: int) -> None:
    """A request with ``budget`` has exactly ``576 - budget`` fewer prompt tokens than the same one without."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [user_message("what colour is the car ?", image)]
    full = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=1)
    pruned = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=1,
                                            extra_body={"visual_token_budget": budget})
    assert pruned.usage.prompt_tokens == full.usage.prompt_tokens - IMAGE_TOKENS + budget


def kv_usage(server: VLLMServer) -> float:
    """The engine's KV-cache usage (fraction of blocks in use)."""
    return load.metric_sum(scrape(server), "vllm:kv_cache_usage_perc")


def settled(read, timeout: float = 20.0, interval: float = 0.25) -> float:
    """``read()`` once two consecutive reads agree (vLLM's stats reach /metrics an iteration late)."""
    deadline, previous = time.monotonic() + timeout, read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        current = read()
        if current == previous:
            return current
        previous = current
    return previous


def post(server: VLLMServer, path: str) -> bytes:
    request = urllib.request.Request(f"{server.base_url}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


# --- load and disconnects ----------------------------------------------------------------------------------
class TestLoad:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, tiny_llava_weights_dir, tmp_path_factory):
        log = tmp_path_factory.mktemp("logs") / "vllm-load.log"
        with VLLMServer(
            tiny_llava_weights_dir,
            # The API-server/engine multimodal *processor* cache is off: under this load vLLM 0.32 once reported
            # "P0/P1 cache drift" and answered 500 for 1 of 480 requests (a budget-1000, i.e. unpruned, item) --
            # vLLM's own retryable cache-drift path (see docs/operations.md, "Limits"). The encoder cache and the
            # prefix cache stay on and are tested here.
            ["--dtype", "float32", "--enable-prefix-caching", "--max-num-seqs", str(CONCURRENCY), "--seed", "0",
             "--mm-processor-cache-gb", "0"],
            env={"VLLM_SERVER_DEV_MODE": "1"},  # /reset_prefix_cache, /reset_mm_cache, /reset_encoder_cache
            log_path=log,
        ) as running:
            running.initial_pids = load.process_group(running.process.pid)
            yield running

    def test_concurrent_mixed_load_equals_solo_and_stays_healthy(self, server):
        pgid = server.process.pid
        assert len(server.initial_pids) >= 3  # API server, engine core, worker (+ resource tracker)
        images = load.default_images(3)
        distinct = load.distinct_specs(num_images=len(images))
        mix = load.request_mix(LOAD_REQUESTS, distinct, seed=1)
        rss = [load.sample_rss(pgid, "start")]

        async def scenario():
            client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                        timeout=300)
            solo = {}
            for spec in distinct:  # each distinct request alone, one after the other
                outcome = await load.run_one(client, server.model_name, spec, images)
                assert outcome.error is None, outcome
                solo[spec.key()] = outcome
            # Start the load from cold caches, so that the concurrent run selects, encodes and fills the prefix
            # cache itself (while identical requests run at the same time) instead of replaying the solo run.
            assert json.loads(post(server, "/reset_prefix_cache"))["success"]
            post(server, "/reset_mm_cache")
            post(server, "/reset_encoder_cache")
            rss.append(load.sample_rss(pgid, "after solo run (warm-up)"))
            halves = []
            started = time.perf_counter()
            for index, half in enumerate((mix[:LOAD_REQUESTS // 2], mix[LOAD_REQUESTS // 2:])):
                halves.append(await load.run_requests(client, server.model_name, half, images, CONCURRENCY))
                rss.append(load.sample_rss(pgid, f"after half {index + 1}"))
            await client.close()
            return solo, halves, time.perf_counter() - started

        solo, halves, seconds = asyncio.run(scenario())
        outcomes = halves[0] + halves[1]
        errors = [outcome for outcome in outcomes if outcome.error]
        summary = {
            "requests": len(outcomes), "distinct": len(distinct), "concurrency": CONCURRENCY,
            "seconds": round(seconds, 1), "errors": len(errors), **load.latency_summary(outcomes),
            "rss_mib": {sample.label: round(sample.mib) for sample in rss},
        }
        print("\nload summary:", json.dumps(summary))
        assert not errors, errors[:5]
        assert len(outcomes) == LOAD_REQUESTS and sum(spec.stream for spec in mix) > LOAD_REQUESTS // 4

        # the prompt is pruned to exactly min(budget, 576) visual tokens
        for key, outcome in solo.items():
            image, question, budget, _ = key
            full = solo[(image, question, None, None)].prompt_tokens
            kept = IMAGE_TOKENS if budget is None else min(budget, IMAGE_TOKENS)
            assert outcome.prompt_tokens == full - IMAGE_TOKENS + kept, key
            assert 1 <= outcome.completion_tokens <= 6, key
        # every concurrent greedy answer equals the same request served alone
        assert load.mismatches(outcomes, solo) == []

        # nothing died or restarted: same processes, server healthy
        assert server.alive()
        assert load.process_group(pgid) == server.initial_pids
        # memory: no growth trend once warm (second half vs first half of the same load). docs/operations.md
        # reports +3 % to +5.4 % over four runs (allocator and encoder-cache warm-up, which flattens after ~2,000
        # requests); 8 % leaves 2.6 points for a loaded CI machine, while a leak of one preprocessed image
        # (3 x 336 x 336 float32, 1.35 MB) per request -- +325 MB over a half, +9.5 % -- fails.
        after_first, after_second = rss[-2].mib, rss[-1].mib
        assert after_second < 1.08 * after_first, summary["rss_mib"]


class TestDisconnects:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, tmp_path_factory):
        # Decoding must be slow enough to watch: the tiny test models decode ~800 tokens a second here, and while
        # they do, vLLM's API server spends its event loop on their outputs and answers /metrics only when they
        # are done. Vicuna-7B's width with two layers (dummy weights) decodes a few dozen tokens a second.
        from textscythe_dev.llava_7b_shape import seven_b_configs
        from textscythe_dev.tiny_models import build_tiny_llava

        text, vision = seven_b_configs(llm_layers=2, vision_layers=1)
        model = build_tiny_llava(tmp_path_factory.mktemp("llava-7b-wide"), kind="llava-1.5", text_config=text,
                                 vision_config=vision)
        with VLLMServer(model, ["--load-format", "dummy", "--dtype", "float32", "--seed", "0"],
                        log_path=tmp_path_factory.mktemp("logs") / "vllm-disconnects.log") as running:
            running.initial_pids = load.process_group(running.process.pid)
            yield running

    def test_client_disconnects_abort_requests_and_leave_nothing_running(self, server):
        max_tokens = 1000  # tens of seconds of decoding here if the request were not aborted
        long_request = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}

        def generated() -> float:
            return load.metric_sum(scrape(server), "vllm:generation_tokens_total")

        async def disconnect_streams(count: int) -> None:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client, \
                    contextlib.AsyncExitStack() as streams:
                readers = []  # kept referenced: a dropped reader would close its connection early
                for index in range(count):
                    body = {"model": server.model_name, "stream": True, "visual_token_budget": 64,
                            "visual_token_selector": ("textscythe", "divprune", "visionzip", "random")[index % 4],
                            "messages": [user_message("what colour is the car ?", scene(400 + index))],
                            **long_request}
                    response = await streams.enter_async_context(
                        client.stream("POST", "/v1/chat/completions", json=body)
                    )
                    assert response.status_code == 200
                    readers.append(response.aiter_lines())
                    async for line in readers[-1]:  # read until the first generated token
                        if line.startswith("data:") and re.search(r'"content":"[^"]', line):
                            break
                # all of them are in the engine, decoding, with most of their tokens still to come
                assert await asyncio.to_thread(wait_until, lambda: in_engine(server) == count, 20)
                at_close.append(await asyncio.to_thread(generated))
            # leaving the stack closed every connection mid-stream

        kv_baseline = kv_usage(server)
        before = generated()
        at_close: list[float] = []
        asyncio.run(disconnect_streams(4))
        assert wait_until(lambda: in_engine(server) == 0, 20), scrape(server)
        # Aborted, whatever the machine's speed: after the disconnect they generated far fewer tokens than they still
        # had to (a stream that was not aborted would have produced all of its remaining tokens).
        remaining = 4 * max_tokens - (at_close[0] - before)
        assert remaining > max_tokens  # the check below is meaningful: most tokens were still to come
        assert settled(generated) - at_close[0] < remaining / 2
        # their KV blocks are free again
        assert wait_until(lambda: kv_usage(server) == kv_baseline, 20), (kv_baseline, kv_usage(server))

        # a non-streaming request whose client leaves while it runs: disconnect once it has generated a token
        body = {"model": server.model_name, "visual_token_budget": 32,
                "messages": [user_message("is there a dog ?", scene(410))], **long_request}
        before = generated()

        async def leave_after_first_token() -> None:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
                request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
                assert await asyncio.to_thread(wait_until, lambda: generated() > before, 60)
                assert not request.done()  # still generating: the client leaves mid-request
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request

        asyncio.run(leave_after_first_token())
        assert wait_until(lambda: in_engine(server) == 0, 30), scrape(server)
        assert 1 <= settled(generated) - before < max_tokens / 2  # it ran, and stopped when the client left
        assert wait_until(lambda: kv_usage(server) == kv_baseline, 20), (kv_baseline, kv_usage(server))

        # later requests are served normally, pruned to the exact count
        assert_prunes_exactly(server, scene(400), 64)
        assert in_engine(server) == 0
        assert server.alive()
        assert load.process_group(server.process.pid) == server.initial_pids


# --- selector failure ----------------------------------------------------------------------------------------
class TestSelectorFailure:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, tiny_llava_dir, tmp_path_factory):
        logs = tmp_path_factory.mktemp("fault")
        with VLLMServer(
            tiny_llava_dir, ["--load-format", "dummy", "--seed", "0"],
            env={"TEXTSCYTHE_FAIL_SELECTION": "1", "TEXTSCYTHE_SELECTION_LOG": str(logs / "selection.jsonl")},
            log_path=logs / "vllm-fault.log",
        ) as running:
            running.selection_log = logs / "selection.jsonl"
            running.initial_pids = load.process_group(running.process.pid)
            yield running

    def test_failing_selector_falls_back_to_uniform_with_exact_counts(self, server):
        import torch

        from textscythe_vllm.selectors import get_selector

        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

        def prompt_tokens(messages, extra=None) -> int:
            response = client.chat.completions.create(
                model=server.model_name, messages=messages, max_tokens=3, temperature=0.0, extra_body=extra
            )
            assert response.choices[0].finish_reason in ("stop", "length")
            return response.usage.prompt_tokens

        def fallbacks(selector: str | None = None) -> float:
            labels = {} if selector is None else {"selector": selector}
            return load.metric_sum(scrape(server), "textscythe_selector_fallbacks_total", **labels)

        def logged() -> list[dict]:
            path = server.selection_log
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        def uniform(budget: int) -> list[int]:
            features = torch.zeros(IMAGE_TOKENS, 8)
            return get_selector("uniform").select(features, None, None, budget).indices.tolist()

        assert fallbacks() == 0
        one = [user_message("what colour is the umbrella ?", scene(21))]
        full_one = prompt_tokens(one)  # no budget: nothing selected, nothing falls back
        assert prompt_tokens(one, {"visual_token_budget": 64}) == full_one - IMAGE_TOKENS + 64
        assert wait_until(lambda: fallbacks("textscythe") == 1, 10), scrape(server)

        two = [user_message("is there a dog ?", scene(22), scene(23))]
        full_two = prompt_tokens(two)
        assert prompt_tokens(two, {"visual_token_budget": 40, "visual_token_selector": "divprune"}) == \
            full_two - 2 * IMAGE_TOKENS + 80
        assert wait_until(lambda: fallbacks("divprune") == 2, 10), scrape(server)

        # a budget that keeps everything selects nothing; streaming takes the same path
        assert prompt_tokens(one, {"visual_token_budget": 1000}) == full_one
        streamed = [user_message("how many cars ?", scene(24))]
        full_streamed = prompt_tokens(streamed)
        stream = client.chat.completions.create(
            model=server.model_name, messages=streamed, max_tokens=3,
            stream=True, stream_options={"include_usage": True},
            extra_body={"visual_token_budget": 7, "visual_token_selector": "visionzip"},
        )
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert usage[-1].prompt_tokens == full_streamed - IMAGE_TOKENS + 7
        assert wait_until(lambda: fallbacks() == 4, 10), scrape(server)

        # the kept tokens are exactly the uniform selector's, whatever selector failed
        records = logged()
        assert [(r["selector"], r["budget"]) for r in records] == \
            [("textscythe", 64), ("divprune", 40), ("divprune", 40), ("visionzip", 7)]
        for record in records:
            assert record["kept_positions"] == uniform(record["budget"]), record["selector"]
        log = server.log_path.read_text(errors="replace")
        assert log.count("selection failure injected by TEXTSCYTHE_FAIL_SELECTION=1") >= 4
        assert "falling back to 'uniform'" in log
        assert "EngineDeadError" not in log
        assert server.alive()
        assert load.process_group(server.process.pid) == server.initial_pids
