"""The documented launch, exposed to an outside client on every route vLLM registers.

A real ``vllm serve`` with the plugin, its middleware, ``--trust-request-mm-kwargs``, ``--api-key`` and
``--root-path /api``, on a tiny LLaVA-1.5 with real (random) weights so the answer depends on the pixels. For
every route that takes messages, hostile variants of one clean request -- HF-processor options that kill the
engine (``do_resize: false`` on a 500 px image), other HF options, ``media_io_kwargs``, forged private keys, bad
budgets -- must give either exactly the clean request's answer or a 4xx naming the field; never a 5xx, and the
server process must live on. Also: the key is checked before a body is read; a server whose model the plugin
does not prune refuses budgets and caches exactly like stock vLLM; offline ``LLM.generate`` drops hostile kwargs.
"""

from __future__ import annotations

import copy
import re
import socket
import threading
import time

import httpx
import pytest

from textscythe_dev.images import data_url, scene
from textscythe_dev.load import metric_sum
from textscythe_dev.server import VLLMServer

pytestmark = pytest.mark.server

KEY = "sk-textscythe-test"
ROOT = "/api"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "what colour is the umbrella next to the red car ?"
IMAGE = data_url(scene(41, 500, 500))

HOSTILE_KWARGS = {
    "engine-killing": {"mm_processor_kwargs": {"do_resize": False, "do_center_crop": False}},
    "hf-options": {"mm_processor_kwargs": {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}},
    "media-io": {"media_io_kwargs": {"image": {"image_mode": "L"}}},
    "forged-private": {"mm_processor_kwargs": {"_textscythe_plans": {"image": [[1, 0, 5]]},
                                               "_textscythe_request": "forged"}},
}
BAD_BUDGETS = [-5, 0, "64", 2.5, True]


@pytest.fixture(scope="module")
def server(tiny_llava_weights_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("security")
    with VLLMServer(
        tiny_llava_weights_dir, ["--dtype", "float32", "--seed", "0", "--api-key", KEY, "--root-path", ROOT],
        log_path=logs / "vllm-security.log",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=180) as client:
        yield client


def chat_messages(image: str = IMAGE) -> list[dict]:
    return [{"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": QUESTION}]}]


# route -> (clean body, how to read the answer that must not change)
def chat_body() -> dict:
    return {"model": "tiny-llava", "messages": chat_messages(), "max_tokens": 4, "temperature": 0.0, "logprobs": True}


def chat_answer(response: dict) -> tuple:
    choice = response["choices"][0]
    return (response["usage"]["prompt_tokens"],
            [(t["token"], round(t["logprob"], 4)) for t in choice["logprobs"]["content"]])


ROUTES = {
    "/v1/chat/completions": (chat_body, chat_answer),
    "/invocations": (chat_body, chat_answer),
    "/v1/chat/completions/batch": (
        lambda: {**chat_body(), "messages": [chat_messages()]},
        lambda response: chat_answer({**response, "choices": response["choices"][:1]}),
    ),
    "/v1/responses": (
        lambda: {"model": "tiny-llava", "max_output_tokens": 4, "temperature": 0.0, "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": IMAGE},
                                         {"type": "input_text", "text": QUESTION}]}]},
        lambda response: (response["usage"]["input_tokens"],
                          [part["text"] for item in response["output"] for part in item.get("content", [])]),
    ),
    "/tokenize": (lambda: {"model": "tiny-llava", "messages": chat_messages()},
                  lambda response: (response["count"], response["tokens"])),
}


def post(http, path: str, body: dict, prefix: str = ROOT) -> httpx.Response:
    return http.post(prefix + path, json=body, headers=AUTH)


def assert_alive(server, pid: int) -> None:
    assert server.process is not None and server.process.pid == pid and server.alive(), server.log_tail()


@pytest.mark.parametrize("path", list(ROUTES))
def test_hostile_requests_never_change_the_answer_or_kill_the_engine(server, http, path):
    make_body, answer = ROUTES[path]
    pid = server.process.pid
    clean = post(http, path, make_body())
    assert clean.status_code == 200, clean.text
    expected = answer(clean.json())
    for name, extra in HOSTILE_KWARGS.items():
        for prefix in (ROOT, ""):  # through --root-path and without it
            response = post(http, path, {**make_body(), **copy.deepcopy(extra)}, prefix)
            assert response.status_code == 200, (name, prefix, response.text)
            assert answer(response.json()) == expected, (name, prefix)
    for budget in BAD_BUDGETS:
        response = post(http, path, {**make_body(), "visual_token_budget": budget})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "visual_token_budget", response.text
    assert_alive(server, pid)


def test_budgets_are_honoured_on_every_route_that_can_carry_them(server, http):
    chat = chat_answer(post(http, "/v1/chat/completions", {**chat_body(), "visual_token_budget": 32}).json())
    invocations = chat_answer(post(http, "/invocations", {**chat_body(), "visual_token_budget": 32}).json())
    full = chat_answer(post(http, "/v1/chat/completions", chat_body()).json())
    assert chat == invocations and chat[0] == full[0] - 576 + 32
    make_body, answer = ROUTES["/tokenize"]
    assert answer(post(http, "/tokenize", {**make_body(), "visual_token_budget": 32}).json())[0] == full[0] - 576 + 32


def test_anthropic_messages_route_refuses_budgets_and_drops_options(server, http):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": IMAGE.split(",", 1)[1]}}
    body = {"model": "tiny-llava", "max_tokens": 2, "temperature": 0.0, "messages": [
        {"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]}
    response = post(http, "/v1/messages", {**body, "visual_token_budget": 32})
    assert response.status_code == 400 and response.json()["error"]["param"] == "visual_token_budget"
    assert "/v1/messages" in response.json()["error"]["message"]
    clean = post(http, "/v1/messages", body)
    hostile = post(http, "/v1/messages", {**body, "media_io_kwargs": {"image": {"image_mode": "L"}}})
    assert clean.status_code == hostile.status_code == 200, hostile.text
    assert clean.json()["usage"] == hostile.json()["usage"]
    assert clean.json()["content"] == hostile.json()["content"]


def test_every_message_route_needs_the_key(server, http):
    for path in ROUTES:
        for prefix in (ROOT, ""):
            response = http.post(prefix + path, json={"model": "tiny-llava", "messages": []})
            assert response.status_code == 401, (prefix + path, response.text)
    assert http.get("/health").status_code == 200 and http.get("/ping").status_code == 200


def _send_anonymous(port: int, path: str, size: int, result: dict) -> None:
    """POST ``size`` bytes without a key over a raw socket; records when the status line arrived."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sock.settimeout(30)
        chunk = b'{"messages":"' + b"A" * (1 << 20)
        sent = 0
        try:
            while sent < size:
                piece = chunk[: min(len(chunk), size - sent)]
                sock.sendall(piece)
                sent += len(piece)
                sock.setblocking(False)
                try:
                    if sock.recv(64, socket.MSG_PEEK):
                        break  # answered before the body was sent
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                    sock.settimeout(30)
        except OSError:
            pass  # the server may close the connection after answering
        status = sock.recv(64)
    result["status"] = int(re.match(rb"HTTP/1\.1 (\d+)", status).group(1))
    result["seconds"] = time.monotonic() - start


@pytest.mark.parametrize("path", ["/invocations", "/v1/chat/completions"])
def test_anonymous_large_body_gets_401_fast_and_health_stays_responsive(server, http, path):
    # The health poller runs before, during and after the upload: a 401 that comes back before a
    # poll from the test thread could start would otherwise leave nothing measured.
    health: list[float] = []
    statuses: list[int] = []
    sending = threading.Event()
    sent = threading.Event()

    def poll_health() -> None:
        while True:
            finished = sent.is_set()  # read first, so the last poll starts after the upload ended
            start = time.monotonic()
            statuses.append(http.get("/health").status_code)
            health.append(time.monotonic() - start)
            sending.set()
            if finished:
                return
            time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    poller.start()
    assert sending.wait(10)
    result: dict = {}
    _send_anonymous(server.port, path, 24 << 20, result)
    sent.set()
    poller.join(10)
    assert not poller.is_alive()
    assert result["status"] == 401 and result["seconds"] < 1.0, result
    assert len(health) >= 2 and set(statuses) == {200}, (health, statuses)
    assert max(health) < 0.2, health
    assert server.alive()


# --- a model the plugin does not prune --------------------------------------------------------------------------
UNSUPPORTED = {
    # the plugin is not loaded at all (VLLM_PLUGINS=): the model is stock vLLM's
    "plugin not loaded": ({"VLLM_PLUGINS": ""}, [], "not loaded"),
    # the plugin is loaded, but vLLM serves the checkpoint with its Transformers backend: an architecture the
    # plugin does not prune
    "unsupported architecture": ({}, ["--model-impl", "transformers"], "TransformersMultiModalForCausalLM"),
}


@pytest.fixture(scope="module", params=list(UNSUPPORTED))
def unsupported_server(request, tiny_llava_dir, tmp_path_factory):
    """The documented launch on a server whose model the plugin does not prune."""
    env, extra, _ = UNSUPPORTED[request.param]
    logs = tmp_path_factory.mktemp("unsupported")
    with VLLMServer(
        tiny_llava_dir,
        ["--load-format", "dummy", "--seed", "0", "--enable-prefix-caching", "--enable-prompt-tokens-details",
         "--block-size", "32", *extra],
        env=env, log_path=logs / "vllm-unsupported.log", startup_timeout=420,
    ) as running:
        running.expected_reason = UNSUPPORTED[request.param][2]
        yield running


def test_unsupported_model_refuses_budgets_and_caches_like_stock(unsupported_server):
    server = unsupported_server
    with httpx.Client(base_url=server.base_url, timeout=180) as http:
        body = {"model": "tiny-llava", "messages": chat_messages(data_url(scene(42))), "max_tokens": 2,
                "temperature": 0.0}
        for extra in ({"visual_token_budget": 64}, {"visual_token_selector": "uniform"},
                      {"mm_processor_kwargs": {"visual_token_budget": 64}}):
            response = http.post("/v1/chat/completions", json={**body, **extra})
            message = response.json()["error"]["message"]
            assert response.status_code == 400 and server.expected_reason in message, message
            assert "'tiny-llava'" in message and "LlavaForConditionalGeneration" in message
        before = http.get("/metrics").text
        first = http.post("/v1/chat/completions", json=body).json()
        second = http.post("/v1/chat/completions", json=body).json()
        after = http.get("/metrics").text
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] > 576
    # the repeat hits the prefix cache through the image (its hash is stock's: no per-request tag in it) ...
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (first["usage"]["prompt_tokens"] - 1) // 32 * 32 >= 576
    # ... and the multimodal processor cache
    assert metric_sum(after, "vllm:mm_cache_hits_total") - metric_sum(before, "vllm:mm_cache_hits_total") == 1


# --- offline -------------------------------------------------------------------------------------------------------
def test_offline_generate_and_chat_drop_hostile_processor_kwargs(tiny_llava_weights_dir, tmp_path):
    from textscythe_dev.offline import finish_runner, start_runner

    prompt = f"USER: <image>\n{QUESTION} ASSISTANT:"
    image = [{"seed": 41, "width": 500, "height": 500}]
    requests = [
        {"id": "clean", "prompt": prompt, "images": image, "max_tokens": 4},
        {"id": "hostile", "prompt": prompt, "images": image, "max_tokens": 4,
         "mm_processor_kwargs": {"do_resize": False, "do_center_crop": False, "image_mean": [0, 0, 0],
                                 "_textscythe_plans": {"image": [[1, 0]]}}},
        {"id": "budget", "prompt": prompt, "images": image, "max_tokens": 4,
         "mm_processor_kwargs": {"visual_token_budget": 32, "do_resize": False}},
    ]
    conversation = [{"role": "system", "text": "answer briefly ."},
                    {"role": "user", "text": QUESTION, "images": image}]
    chat = [{"id": "clean", "messages": conversation, "max_tokens": 4},
            {"id": "hostile", "messages": conversation, "max_tokens": 4,
             "mm_processor_kwargs": {"do_resize": False, "do_center_crop": False, "_textscythe_request": "forged"}}]
    process, output, log = start_runner(tiny_llava_weights_dir, tmp_path, "hostile", requests, {},
                                        llm_kwargs={"dtype": "float32"}, chat=chat)
    results = finish_runner(process, output, log, time.monotonic() + 420)
    chats = {entry["id"]: entry for entry in results["chat"]}  # LLM.chat: the same allow-list
    assert chats["hostile"]["token_ids"] == chats["clean"]["token_ids"]
    assert chats["hostile"]["logprobs"] == pytest.approx(chats["clean"]["logprobs"], abs=1e-5)
    by_id = {entry["id"]: entry for entry in results["batch"]}
    assert by_id["hostile"]["token_ids"] == by_id["clean"]["token_ids"]
    assert by_id["hostile"]["logprobs"] == pytest.approx(by_id["clean"]["logprobs"], abs=1e-5)
    assert len(by_id["budget"]["prompt_token_ids"]) == len(by_id["clean"]["prompt_token_ids"]) - 576 + 32


OTHER_ROUTES = ["/v1/chat/completions/render", "/v1/completions/render", "/v1/responses/render", "/v1/messages/render",
                "/v1/messages/count_tokens", "/inference/v1/generate", "/v1/completions", "/v1/messages"]


@pytest.mark.parametrize("path", OTHER_ROUTES)
def test_every_other_route_survives_hostile_bodies(server, http, path):
    """Routes whose answers are not compared above (render, count, pre-processed generate): hostile processor
    options, media options and forged keys never give a 5xx and never stop the server."""
    pid = server.process.pid
    for extra in HOSTILE_KWARGS.values():
        for body in ({**chat_body(), **copy.deepcopy(extra)}, {"model": "tiny-llava", "prompt": "hi", **copy.deepcopy(extra)}):
            response = post(http, path, body)
            assert response.status_code < 500, (path, response.status_code, response.text[:300])
    assert_alive(server, pid)
