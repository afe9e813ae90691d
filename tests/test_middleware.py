"""The ASGI middleware on its own: rewriting, validation, allow-listing, pass-through, limits."""

from __future__ import annotations

import asyncio
import json

import pytest

from textscythe_vllm.middleware import VisualTokenBudgetMiddleware, rewrite_payload


class Downstream:
    """Records what reached the app and answers 200."""

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.headers: dict[bytes, bytes] = {}
        self.after_body: list[dict] = []

    async def __call__(self, scope, receive, send):
        self.headers = dict(scope.get("headers", []))
        message = await receive()
        self.body = message.get("body", b"")
        if scope.get("path") == "/wait-disconnect":
            self.after_body.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(app, body: bytes, path: str = "/v1/chat/completions", method: str = "POST", chunks: int = 1):
    sent: list[dict] = []
    size = -(-len(body) // chunks)
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    messages.append({"type": "http.disconnect"})

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, payload


def test_top_level_fields_move_into_mm_processor_kwargs():
    downstream = Downstream()
    app = VisualTokenBudgetMiddleware(downstream)
    body = {"model": "m", "messages": [], "visual_token_budget": 64, "visual_token_selector": "divprune",
            "mm_processor_kwargs": {"visual_token_budget": 8, "do_resize": False}, "media_io_kwargs": {"x": 1}}
    status, _ = call(app, json.dumps(body).encode())
    assert status == 200
    forwarded = json.loads(downstream.body)
    tag = forwarded["request_id"]  # set by the middleware, so latency can be attributed to the budget
    assert len(tag) == 32
    assert forwarded["mm_processor_kwargs"] == {
        "visual_token_budget": 64, "visual_token_selector": "divprune", "_textscythe_request": tag
    }
    assert "visual_token_budget" not in forwarded and "media_io_kwargs" not in forwarded
    assert downstream.headers[b"content-length"] == str(len(downstream.body)).encode()


def test_request_tag_follows_client_ids():
    downstream = Downstream()
    call(VisualTokenBudgetMiddleware(downstream), json.dumps({"request_id": "mine-1"}).encode())
    assert json.loads(downstream.body)["mm_processor_kwargs"] == {"_textscythe_request": "mine-1"}


def test_client_cannot_forge_private_keys():
    forwarded = rewrite_payload({"mm_processor_kwargs": {"_textscythe_request": "x", "_textscythe_plans": [1]}})
    assert "mm_processor_kwargs" not in forwarded


def test_no_budget_means_no_mm_processor_kwargs():
    forwarded = rewrite_payload({"model": "m", "mm_processor_kwargs": {"size": 3}})
    assert "mm_processor_kwargs" not in forwarded


@pytest.mark.parametrize("value", [0, -1, 2.5, 64.0, True, "64", None, [1], {"a": 1}, 2**80])
def test_bad_budget_is_400_naming_the_field(value):
    downstream = Downstream()
    status, payload = call(VisualTokenBudgetMiddleware(downstream),
                           json.dumps({"model": "m", "visual_token_budget": value}).encode())
    error = json.loads(payload)["error"]
    assert status == 400 and error["param"] == "visual_token_budget" and error["code"] == 400
    assert "visual_token_budget" in error["message"]
    assert downstream.body is None  # nothing reached vLLM


def test_bad_budget_inside_mm_processor_kwargs_is_also_400():
    status, payload = call(VisualTokenBudgetMiddleware(Downstream()),
                           json.dumps({"mm_processor_kwargs": {"visual_token_budget": "x"}}).encode())
    assert status == 400 and json.loads(payload)["error"]["param"] == "visual_token_budget"


def test_mm_processor_kwargs_must_be_an_object():
    status, payload = call(VisualTokenBudgetMiddleware(Downstream()),
                           json.dumps({"mm_processor_kwargs": [1, 2]}).encode())
    assert status == 400 and json.loads(payload)["error"]["param"] == "mm_processor_kwargs"


def test_unknown_selector_is_400():
    status, payload = call(VisualTokenBudgetMiddleware(Downstream()),
                           json.dumps({"visual_token_budget": 3, "visual_token_selector": "magic"}).encode())
    assert status == 400 and json.loads(payload)["error"]["param"] == "visual_token_selector"


def test_malformed_json_and_oversized_bodies():
    status, payload = call(VisualTokenBudgetMiddleware(Downstream()), b"{oops")
    assert status == 400 and "JSON" in json.loads(payload)["error"]["message"]
    status, payload = call(VisualTokenBudgetMiddleware(Downstream(), max_body_bytes=100), b"x" * 101, chunks=3)
    assert status == 413


def test_deeply_nested_bodies_are_400():
    for depth in (65, 200, 969, 5000):
        body = b'{"messages":' + b"[" * depth + b"]" * depth + b"}"
        status, payload = call(VisualTokenBudgetMiddleware(Downstream()), body)
        message = json.loads(payload)["error"]["message"]
        # Whether json.loads itself hits the recursion limit depends on the stack depth at hand; either way
        # the middleware answers, nothing reaches vLLM.
        assert status == 400 and ("nests deeper" in message or "recursion" in message)
        if depth <= 200:
            assert "nests deeper" in message
    downstream = Downstream()
    ok = b'{"messages":' + b"[" * 30 + b"]" * 30 + b"}"
    assert call(VisualTokenBudgetMiddleware(downstream), ok)[0] == 200


def test_body_in_chunks_and_other_paths_pass_through():
    downstream = Downstream()
    body = json.dumps({"visual_token_budget": 5, "messages": ["x" * 500]}).encode()
    assert call(VisualTokenBudgetMiddleware(downstream), body, chunks=7)[0] == 200
    forwarded = json.loads(downstream.body)
    assert forwarded["mm_processor_kwargs"] == {"visual_token_budget": 5, "_textscythe_request": forwarded["request_id"]}
    untouched = Downstream()
    call(VisualTokenBudgetMiddleware(untouched), b"raw", path="/v1/models")
    assert untouched.body == b"raw"
    # JSON that is not an object is left for vLLM to reject.
    call(VisualTokenBudgetMiddleware(untouched), b"[1,2]")
    assert untouched.body == b"[1,2]"


def test_disconnect_after_body_reaches_the_app():
    downstream = Downstream()
    app = VisualTokenBudgetMiddleware(downstream)
    app_paths = {"/wait-disconnect"}
    import textscythe_vllm.middleware as module

    original = module.REWRITTEN_PATHS
    module.REWRITTEN_PATHS = frozenset(original | app_paths)
    try:
        call(app, b"{}", path="/wait-disconnect")
    finally:
        module.REWRITTEN_PATHS = original
    assert downstream.after_body == [{"type": "http.disconnect"}]
