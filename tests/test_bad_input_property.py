"""Bad input against a real ``vllm serve`` with the plugin: property tests (hypothesis) over request bodies.

Property: every request gets either a 4xx with a JSON error message, or a 200 with the right answer -- when
a valid budget was sent, ``prompt_tokens == text + min(budget, 576)`` per image -- never a 5xx, and the
server stays alive after every example. The plugin's own validation is predicted exactly (status, ``param``).

Also end to end: only the allow-listed keys reach the multimodal processor, whatever the request shape
(HF-processor options, ``media_io_kwargs`` and the plugin's private keys sent by a client change nothing);
bodies above ``TEXTSCYTHE_MAX_BODY_BYTES`` get 413.
"""

from __future__ import annotations

import base64
import io
import json
from functools import cache
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from textscythe_dev.images import data_url, scene
from textscythe_dev.server import VLLMServer
from textscythe_vllm.request import MAX_BUDGET
from textscythe_vllm.selectors import available_selectors

pytestmark = pytest.mark.server

IMAGE_TOKENS = 576
MAX_BODY_BYTES = 2_000_000
BUDGET, SELECTOR, MM_KWARGS = "visual_token_budget", "visual_token_selector", "mm_processor_kwargs"
PROPERTY_SETTINGS = settings(
    max_examples=80, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def server(tiny_llava_weights_dir, tmp_path_factory):
    # real (random) weights: the answer and its log-probabilities depend on the pixels (vLLM's dummy weights are
    # too small for that), which the allow-list test relies on
    logs = tmp_path_factory.mktemp("bad-input")
    with VLLMServer(
        tiny_llava_weights_dir, ["--dtype", "float32", "--seed", "0"],
        env={"TEXTSCYTHE_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "TEXTSCYTHE_SELECTION_LOG": str(logs / "sel.jsonl")},
        log_path=logs / "vllm-bad-input.log",
    ) as running:
        running.selection_log = logs / "sel.jsonl"
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=180) as client:
        yield client


# --- images: ordinary, tiny, thin, huge, odd aspect ----------------------------------------------------------
def _png_url(image: Image.Image) -> str:
    return data_url(image)


@cache
def image_urls() -> dict[str, str]:
    return {
        "scene": _png_url(scene(300)),
        "small": _png_url(scene(301, 64, 64)),
        "1x1": _png_url(Image.new("RGB", (1, 1), (200, 10, 10))),
        "2x300": _png_url(Image.new("RGB", (2, 300), (10, 200, 10))),
        "300x2": _png_url(scene(302, 300, 2)),
        "odd": _png_url(scene(303, 517, 41)),
        "gray": _png_url(Image.new("L", (90, 70), 128)),
        "rgba": _png_url(Image.new("RGBA", (50, 80), (1, 2, 3, 4))),
        # 3000 x 3000: 27 MB of pixels, a small PNG (one colour)
        "huge": _png_url(Image.new("RGB", (3000, 3000), (30, 60, 90))),
    }


def jpeg_url(seed: int, size: int) -> str:
    buffer = io.BytesIO()
    scene(seed, size, size).save(buffer, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def content_for(image_keys: list[str], text: str | None) -> list[dict[str, Any]] | str:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_urls()[key]}} for key in image_keys]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return parts


# --- the oracle for the plugin's fields ------------------------------------------------------------------------
def valid_budget(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_BUDGET


def valid_selector(value: object) -> bool:
    return isinstance(value, str) and value in available_selectors()


def expected_outcome(body: dict[str, Any]) -> tuple[int, str | None, int | None]:
    """(status, param of the 400 or None, effective budget or None), as the middleware decides."""
    kwargs = body.get(MM_KWARGS)
    if MM_KWARGS in body and kwargs is not None and not isinstance(kwargs, dict):
        return 400, MM_KWARGS, None
    fields = {key: value for key, value in (kwargs or {}).items() if key in (BUDGET, SELECTOR)}
    fields.update({key: body[key] for key in (BUDGET, SELECTOR) if key in body})
    if BUDGET in fields and not valid_budget(fields[BUDGET]):
        return 400, BUDGET, None
    if SELECTOR in fields and not valid_selector(fields[SELECTOR]):
        return 400, SELECTOR, None
    return 200, None, fields.get(BUDGET)


_baselines: dict[tuple, int] = {}


def unpruned_prompt_tokens(http: httpx.Client, server: VLLMServer, image_keys: list[str], text: str | None) -> int:
    """Prompt tokens of the same messages without any budget (one request per distinct shape)."""
    key = (len(image_keys), text)
    if key not in _baselines:
        response = http.post("/v1/chat/completions", json={
            "model": server.model_name, "max_tokens": 1,
            "messages": [{"role": "user", "content": content_for(image_keys, text)}],
        })
        assert response.status_code == 200, response.text
        _baselines[key] = response.json()["usage"]["prompt_tokens"]
    return _baselines[key]


def assert_json_error(response: httpx.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:2000])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"].strip()
    return error


# --- strategies ----------------------------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.integers(-5, 2000),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
    st.sampled_from([0, -1, 1, 64, 575, 576, 577, MAX_BUDGET, MAX_BUDGET + 1, 10**30, 2**63, 64.0, 1e300,
                     "64", "", True, False]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=6,
)
# about half valid, half not (json_scalars holds the edge values 0, 577, MAX_BUDGET + 1, 64.0, "64", True, ...)
budgets = st.one_of(st.integers(1, 1000), st.sampled_from([1, 32, 64, 192, 576, 1000, MAX_BUDGET]), json_scalars,
                    json_values)
selectors = st.one_of(st.sampled_from(available_selectors()), st.sampled_from(available_selectors()), json_values)
#: keys a client must not be able to hand to the processor (HF options, the plugin's private keys)
forbidden_keys = st.sampled_from(
    ["do_resize", "size", "crop_size", "do_center_crop", "image_mean", "image_std", "do_normalize", "resample",
     "_textscythe_plans", "_textscythe_request", "vision_feature_select_strategy", "num_crops", "x"]
)


@st.composite
def chat_bodies(draw) -> dict[str, Any]:
    image_keys = draw(st.lists(st.sampled_from(sorted(image_urls())), max_size=6))
    text = draw(st.one_of(st.none(), st.sampled_from(["what colour is the car ?", "describe the image .", ""])))
    if not image_keys and text is None:
        text = "hello"
    body: dict[str, Any] = {"max_tokens": 2, "temperature": 0.0,
                            "messages": [{"role": "user", "content": content_for(image_keys, text)}]}
    # where the plugin's fields go: absent, top level, inside mm_processor_kwargs, or both (top level wins)
    kwargs_shape = draw(st.sampled_from(["absent", "dict", "dict", "dict", "null", "other"]))
    kwargs: Any = None
    if kwargs_shape == "dict":
        kwargs = draw(st.dictionaries(forbidden_keys, json_values, max_size=3))
    elif kwargs_shape == "other":
        kwargs = draw(st.one_of(json_scalars.filter(lambda value: value is not None), st.lists(json_scalars, max_size=2)))
    for field, values in ((BUDGET, budgets), (SELECTOR, selectors)):
        placement = draw(st.sampled_from(["absent", "top", "inner", "both"]))
        if placement in ("top", "both"):
            body[field] = draw(values)
        if placement in ("inner", "both") and kwargs_shape == "dict":
            kwargs[field] = draw(values)
    if kwargs_shape != "absent":
        body[MM_KWARGS] = kwargs
    if draw(st.booleans()):
        body["media_io_kwargs"] = draw(json_values)
    if draw(st.booleans()):
        body["_textscythe_plans"] = draw(json_values)
    body["_image_keys"], body["_text"] = image_keys, text  # for the oracle; removed before sending
    return body


# --- properties ------------------------------------------------------------------------------------------------
@PROPERTY_SETTINGS
@given(body=chat_bodies())
def test_any_request_body_gets_a_4xx_or_a_correct_answer(server, http, body):
    image_keys, text = body.pop("_image_keys"), body.pop("_text")
    body["model"] = server.model_name
    status, param, budget = expected_outcome(body)
    event(f"expected {status} {param or ''}".strip())
    if status == 200 and budget is not None and image_keys:
        event("pruned" if budget < IMAGE_TOKENS else "budget keeps all")
    response = http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:2000])
    if status == 400:
        assert response.status_code == 400, response.text[:2000]
        error = assert_json_error(response)
        assert error["param"] == param and param in error["message"], error
    else:
        assert response.status_code == 200, response.text[:2000]
        usage = response.json()["usage"]
        full = unpruned_prompt_tokens(http, server, image_keys, text)
        kept = IMAGE_TOKENS if budget is None else min(budget, IMAGE_TOKENS)
        assert usage["prompt_tokens"] == full - len(image_keys) * (IMAGE_TOKENS - kept), (budget, image_keys)
        assert usage["completion_tokens"] >= 1
    assert server.alive()


@settings(max_examples=40, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    image_keys=st.lists(st.sampled_from(sorted(image_urls())), min_size=1, max_size=6),
    text=st.one_of(st.none(), st.sampled_from(["what colour is the car ?", "is there a dog ?"])),
    budget=st.one_of(st.integers(1, 700), st.sampled_from([1, 575, 576, 577, MAX_BUDGET])),
    selector=st.one_of(st.none(), st.sampled_from(available_selectors())),
    placement=st.sampled_from(["top", "inner", "both"]),
    hostile=st.dictionaries(forbidden_keys, json_values, max_size=3),
    stream=st.booleans(),
)
def test_valid_budgets_prune_to_exactly_the_budget(server, http, image_keys, text, budget, selector, placement,
                                                   hostile, stream):
    """The correct-answer side of the property, with many images of odd sizes and hostile processor keys."""
    fields = {BUDGET: budget, **({} if selector is None else {SELECTOR: selector})}
    body: dict[str, Any] = {"model": server.model_name, "max_tokens": 2, "temperature": 0.0,
                            "messages": [{"role": "user", "content": content_for(image_keys, text)}],
                            MM_KWARGS: dict(hostile)}
    if placement in ("top", "both"):
        body.update(fields)
    if placement in ("inner", "both"):
        body[MM_KWARGS].update(fields if placement == "inner" else {BUDGET: 3, SELECTOR: "uniform"})  # top wins
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    event("pruned" if budget < IMAGE_TOKENS else "budget keeps all")
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text[:2000]
    if stream:
        chunks = [json.loads(line[5:]) for line in response.text.splitlines()
                  if line.startswith("data:") and line.strip() != "data: [DONE]"]
        assert not any("error" in chunk for chunk in chunks), chunks[-1]
        usage = [chunk["usage"] for chunk in chunks if chunk.get("usage")][-1]
    else:
        usage = response.json()["usage"]
    full = unpruned_prompt_tokens(http, server, image_keys, text)
    assert usage["prompt_tokens"] == full - len(image_keys) * (IMAGE_TOKENS - min(budget, IMAGE_TOKENS))
    assert server.alive()


def mangled_bodies() -> st.SearchStrategy[bytes]:
    valid = json.dumps({"model": "tiny-llava", "max_tokens": 1, BUDGET: 8,
                        "messages": [{"role": "user", "content": "hello"}]}).encode()
    truncated = st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut])
    spliced = st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=8)).map(
        lambda t: valid[:t[0]] + t[1] + valid[t[0]:]
    )
    deep = st.integers(50, 3000).map(lambda depth: b'{"messages":' + b"[" * depth + b"]" * depth + b"}")
    literals = st.sampled_from([b"", b"null", b"[]", b"1", b'"x"', b"{}", b"\xff\xfe\x00", b"NaN", b"-Infinity",
                                b'{"visual_token_budget": 9' + b"9" * 5000 + b"}", b'{"messages": 5}',
                                b'{"model": "tiny-llava", "messages": null}'])
    return st.one_of(truncated, spliced, deep, literals, st.binary(max_size=64))


@settings(max_examples=60, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=mangled_bodies())
@example(raw=b'{"messages":' + b"[" * 969 + b"]" * 969 + b"}")  # parsed, but too deep for vLLM: a 400 of ours
def test_malformed_bodies_are_4xx_json_errors(server, http, raw):
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    event(f"status {response.status_code}")
    if response.status_code == 200:  # a splice can still be a valid request
        assert "choices" in response.json()
    else:
        assert_json_error(response)
    assert server.alive()


# --- fixed cases ----------------------------------------------------------------------------------------------
def chat(http, server, content, **fields) -> httpx.Response:
    body = {"model": server.model_name, "max_tokens": 3, "temperature": 0.0, "logprobs": True,
            "messages": [{"role": "user", "content": content}], **fields}
    return http.post("/v1/chat/completions", json=body)


def selection_count(server) -> int:
    path = server.selection_log
    return len(path.read_text().splitlines()) if path.exists() else 0


def fingerprint(response: httpx.Response) -> tuple[int, str, list[float]]:
    """Prompt tokens, answer and its log-probabilities: what a change in the processed pixels would move."""
    assert response.status_code == 200, response.text[:2000]
    payload = response.json()
    choice = payload["choices"][0]
    logprobs = [item["logprob"] for item in choice["logprobs"]["content"]]
    return payload["usage"]["prompt_tokens"], choice["message"]["content"], logprobs


def test_only_allow_listed_keys_reach_the_processor(server, http):
    # not 336 x 336: resizing and cropping matter for this image
    content = [{"type": "image_url", "image_url": {"url": jpeg_url(310, 500)}},
               {"type": "text", "text": "what colour is the car ?"}]
    reference = fingerprint(chat(http, server, content))
    hostile_kwargs = {
        "do_resize": False, "size": {"shortest_edge": 14}, "crop_size": {"height": 14, "width": 14},
        "do_center_crop": False, "image_mean": [100.0, 100.0, 100.0], "do_normalize": False,
        "_textscythe_plans": [[5, 0, 1, 2, 3]], "_textscythe_request": "forged-tag",
    }
    before = selection_count(server)
    forged = chat(http, server, content, mm_processor_kwargs=hostile_kwargs, media_io_kwargs={"image": {"mode": "L"}},
                  _textscythe_plans=[[5, 0]], _textscythe_request="forged-tag")
    # unchanged pixels (same answer and log-probabilities), no pruning, no selection ran
    tokens, answer, logprobs = fingerprint(forged)
    assert (tokens, answer) == reference[:2]
    assert logprobs == pytest.approx(reference[2], abs=1e-4)
    assert selection_count(server) == before
    # with an allow-listed budget next to the hostile keys: exactly that budget, one selection of 576 tokens
    pruned = chat(http, server, content, mm_processor_kwargs={**hostile_kwargs, BUDGET: 16})
    assert fingerprint(pruned)[0] == reference[0] - IMAGE_TOKENS + 16
    records = [json.loads(line) for line in server.selection_log.read_text().splitlines()[before:]]
    assert [(r["budget"], r["num_tokens"], len(r["kept_positions"])) for r in records] == [(16, IMAGE_TOKENS, 16)]
    assert server.alive()


def test_oversized_body_is_413_and_limit_is_exact(server, http):
    question = {"type": "text", "text": "what colour is the car ?"}
    # a ~3 MB body: an image whose data URL alone exceeds the 2 MB limit
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8))
    big = [{"type": "image_url", "image_url": {"url": _png_url(noise)}}, question]
    body = json.dumps({"model": server.model_name, "max_tokens": 1, "messages": [{"role": "user", "content": big}],
                       BUDGET: 8}).encode()
    assert len(body) > MAX_BODY_BYTES
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    error = assert_json_error(response)
    assert error["type"] == "RequestTooLargeError" and str(MAX_BODY_BYTES) in error["message"]
    # just under the limit: served
    padding = MAX_BODY_BYTES - 1000
    small = json.dumps({"model": server.model_name, "max_tokens": 1, "padding": "x" * padding,
                        "messages": [{"role": "user", "content": "hello"}]}).encode()
    assert len(small) <= MAX_BODY_BYTES
    assert http.post("/v1/chat/completions", content=small, headers={"content-type": "application/json"}
                     ).status_code == 200
    assert server.alive()


def test_budget_without_image_and_image_without_text(server, http):
    text_only = chat(http, server, "hello there")
    assert fingerprint(chat(http, server, "hello there", visual_token_budget=5))[0] == fingerprint(text_only)[0]
    image_only = [{"type": "image_url", "image_url": {"url": image_urls()["scene"]}}]
    full = fingerprint(chat(http, server, image_only))[0]
    for selector in available_selectors():
        response = chat(http, server, image_only, visual_token_budget=9, visual_token_selector=selector)
        assert fingerprint(response)[0] == full - IMAGE_TOKENS + 9, selector
    assert server.alive()


def test_many_tiny_huge_and_odd_images_with_a_budget(server, http):
    keys = ["1x1", "2x300", "300x2", "huge", "odd", "gray"]
    content = content_for(keys, "what is in the images ?")
    full = fingerprint(chat(http, server, content))[0]
    assert fingerprint(chat(http, server, content, visual_token_budget=20))[0] == full - 6 * (IMAGE_TOKENS - 20)
    assert server.alive()


def test_unparseable_bodies_are_answered_by_the_middleware_without_a_trace(server, http):
    # json.loads raises a plain ValueError (not JSONDecodeError) for integers above Python's 4,300-digit limit;
    # it used to escape the middleware as "Exception in ASGI application" (answered 400 only by vLLM's handler)
    for raw in (b'{"visual_token_budget": 9' + b"9" * 5000 + b"}", b"[" * 5000 + b"]" * 5000, b"\xff\xfe{"):
        response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert assert_json_error(response)["message"].startswith("request body is not valid JSON")
    assert "Exception in ASGI application" not in server.log_path.read_text(errors="replace")
    assert server.alive()
