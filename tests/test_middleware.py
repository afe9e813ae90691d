"""The ASGI middleware on its own, inside vLLM's real app (routes, API-key middleware): which routes it guards,
rewriting, validation, allow-listing, request ids, the key check before any body is read, limits."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from textscythe_vllm import metrics, plugin
from textscythe_vllm.middleware import VisualTokenBudgetMiddleware, rewrite_payload

KEY = "test-key"
AUTH = [(b"authorization", f"Bearer {KEY}".encode())]


@pytest.fixture(scope="module")
def vllm_app():
    """vLLM 0.32's own FastAPI app for a generate model with ``--api-key``, as ``vllm serve`` builds it."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", "--api-key", KEY])
    app = build_app(args, ("generate",), None)
    serve_model(app, "LlavaForConditionalGeneration")
    return app


def serve_model(app, architecture: str) -> None:
    app.state.vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(served_model_name="tiny", architecture=architecture)
    )


@pytest.fixture(autouse=True)
def plugin_loaded(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", True)


class Downstream:
    """Records what reached vLLM and answers 200."""

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.headers: dict[bytes, bytes] = {}
        self.after_body: list[dict] = []

    async def __call__(self, scope, receive, send):
        self.headers = dict(scope.get("headers", []))
        message = await receive()
        self.body = message.get("body", b"")
        if scope.get("wait_disconnect"):
            self.after_body.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(middleware, body: bytes, path: str = "/v1/chat/completions", *, app=None, headers=AUTH,
         chunks: int = 1, root_path: str = "", **scope_extra):
    """Run one POST through ``middleware`` with ``app`` (vLLM's) as the routing app; returns (status, body, reads)
    where ``reads`` counts the body messages the middleware pulled."""
    sent: list[dict] = []
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    messages.append({"type": "http.disconnect"})
    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": root_path + path, "root_path": root_path,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers], **scope_extra}
    if app is not None:
        scope["app"] = app
    asyncio.run(middleware(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, payload, reads


def guarded(vllm_app, body: dict, path: str = "/v1/chat/completions", **kwargs):
    downstream = Downstream()
    status, payload, _ = call(VisualTokenBudgetMiddleware(downstream), json.dumps(body).encode(), path,
                              app=vllm_app, **kwargs)
    return status, payload, downstream


# --- which routes ---------------------------------------------------------------------------------------------
def test_guarded_routes_are_derived_from_the_app(vllm_app):
    from textscythe_vllm.routes import RouteTable

    policies = {policy.path: policy for policy in RouteTable().guarded_paths(vllm_app)}
    # every route of vLLM 0.32 that takes messages, prompts or a raw body reaches the middleware
    for path in ("/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses", "/v1/completions",
                 "/tokenize", "/invocations", "/v1/messages", "/v1/messages/count_tokens",
                 "/v1/chat/completions/render", "/inference/v1/generate"):
        assert path in policies, path
    for path in ("/ping", "/detokenize", "/v1/models", "/health", "/metrics"):
        assert path not in policies, path
    assert policies["/v1/chat/completions"].carries_budget and not policies["/v1/chat/completions"].refuses_budget
    assert policies["/invocations"].carries_budget
    assert policies["/v1/messages"].refuses_budget and not policies["/v1/messages"].carries_budget
    assert policies["/v1/responses"].request_id_factory().startswith("resp_")


def test_every_message_route_is_rewritten(vllm_app):
    hostile = {"model": "m", "messages": [], "visual_token_budget": 64, "visual_token_selector": "divprune",
               "mm_processor_kwargs": {"visual_token_budget": 8, "do_resize": False, "_textscythe_plans": [1],
                                       "_textscythe_request": "forged"},
               "media_io_kwargs": {"image": {"mode": "L"}}}
    for path in ("/v1/chat/completions", "/v1/chat/completions/batch", "/invocations", "/tokenize",
                 "/v1/responses", "/v1/chat/completions/render"):
        status, _, downstream = guarded(vllm_app, dict(hostile), path)
        assert status == 200, path
        forwarded = json.loads(downstream.body)
        kwargs = forwarded["mm_processor_kwargs"]
        assert {k: v for k, v in kwargs.items() if k != "_textscythe_request"} == {
            "visual_token_budget": 64, "visual_token_selector": "divprune"}, path
        assert kwargs["_textscythe_request"] != "forged"
        assert "visual_token_budget" not in forwarded and "media_io_kwargs" not in forwarded
        assert downstream.headers[b"content-length"] == str(len(downstream.body)).encode()


def test_root_path_prefix_is_guarded(vllm_app):
    status, payload, downstream = guarded(vllm_app, {"visual_token_budget": -5}, root_path="/api")
    assert status == 400 and json.loads(payload)["error"]["param"] == "visual_token_budget"
    assert downstream.body is None
    status, _, downstream = guarded(vllm_app, {"mm_processor_kwargs": {"do_resize": False}}, root_path="/api")
    assert status == 200 and "do_resize" not in downstream.body.decode()


def test_unguarded_routes_pass_through_untouched(vllm_app):
    for path in ("/detokenize", "/v1/no-such-route"):
        downstream = Downstream()
        body = b'{"mm_processor_kwargs": {"do_resize": false}}'
        assert call(VisualTokenBudgetMiddleware(downstream), body, path, app=vllm_app)[0] == 200
        assert downstream.body == body


# --- request ids and the latency ticket -------------------------------------------------------------------------
def redeem(ticket, bucket: str) -> bool:
    """What the processor does with a ticket: claim its ids (once), file the bucket under them."""
    request_ids = metrics.REQUEST_BUCKETS.claim(ticket)
    metrics.REQUEST_BUCKETS.file(request_ids, bucket)
    return bool(request_ids)


def test_request_ids_stay_vllms_and_the_ticket_files_the_bucket(vllm_app):
    status, _, downstream = guarded(vllm_app, {"messages": []})
    chat_id = json.loads(downstream.body)["request_id"]
    assert status == 200 and len(chat_id) == 16  # vLLM's own random_uuid() format
    ticket = json.loads(downstream.body)["mm_processor_kwargs"]["_textscythe_request"]
    assert redeem(ticket, "<=64")
    assert not redeem(ticket, "<=64")  # one use
    assert metrics.REQUEST_BUCKETS.pop(f"chatcmpl-{chat_id}") == "<=64"

    _, _, downstream = guarded(vllm_app, {"input": "x"}, "/v1/responses")
    response_id = json.loads(downstream.body)["request_id"]
    assert response_id.startswith("resp_")  # ResponsesRequest's own default
    redeem(json.loads(downstream.body)["mm_processor_kwargs"]["_textscythe_request"], "none")
    assert metrics.REQUEST_BUCKETS.pop(f"{response_id}_0") == "none"  # the responses route's sub-request id

    _, _, downstream = guarded(vllm_app, {"messages": []}, headers=[*AUTH, (b"x-request-id", b"mine-1")])
    redeem(json.loads(downstream.body)["mm_processor_kwargs"]["_textscythe_request"], "none")
    assert metrics.REQUEST_BUCKETS.pop("chatcmpl-mine-1") == "none"

    _, _, downstream = guarded(vllm_app, {"messages": []}, "/invocations")
    header_id = downstream.headers[b"x-request-id"].decode()  # a raw-body route: the id travels as a header
    assert "request_id" not in json.loads(downstream.body)
    redeem(json.loads(downstream.body)["mm_processor_kwargs"]["_textscythe_request"], "none")
    assert metrics.REQUEST_BUCKETS.pop(f"chatcmpl-{header_id}") == "none"


def test_forged_tickets_file_nothing():
    assert not redeem("forged-tag", "<=64")
    assert not redeem(["not", "a", "str"], "<=64")


# --- the API key, before the body ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/invocations", "/tokenize", "/v1/responses"])
def test_key_is_checked_before_the_body_is_read(vllm_app, path):
    downstream = Downstream()
    for headers in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", f"Basic {KEY}".encode())]):
        status, payload, reads = call(VisualTokenBudgetMiddleware(downstream), b"{}" * 1000, path, app=vllm_app,
                                      headers=headers)
        assert status == 401 and reads == 0 and downstream.body is None
        assert json.loads(payload)["error"]["code"] == 401
    assert call(VisualTokenBudgetMiddleware(downstream), b"{}", path, app=vllm_app)[0] == 200


def test_key_scope_can_be_limited_to_vllms_own(vllm_app, monkeypatch):
    monkeypatch.setenv("TEXTSCYTHE_API_KEY_ALL_ROUTES", "0")
    middleware = VisualTokenBudgetMiddleware(Downstream())
    assert call(middleware, b"{}", "/invocations", app=vllm_app, headers=[])[0] == 200
    assert call(middleware, b"{}", "/v1/chat/completions", app=vllm_app, headers=[])[0] == 401


# --- models and routes that cannot prune -----------------------------------------------------------------------
def test_unsupported_model_refuses_any_plugin_field(vllm_app):
    serve_model(vllm_app, "Qwen2VLForConditionalGeneration")
    try:
        for body in ({"visual_token_budget": 64}, {"visual_token_selector": "uniform"},
                     {"mm_processor_kwargs": {"visual_token_budget": 3}}):
            status, payload, downstream = guarded(vllm_app, body)
            error = json.loads(payload)["error"]
            assert status == 400 and downstream.body is None
            assert "'tiny'" in error["message"] and "Qwen2VLForConditionalGeneration" in error["message"]
            assert "LlavaForConditionalGeneration" in error["message"]
        # without plugin fields the request is stock vLLM's: nothing private reaches the stock processor
        status, _, downstream = guarded(vllm_app, {"messages": [], "mm_processor_kwargs": {"do_resize": False}})
        assert status == 200 and json.loads(downstream.body) == {"messages": []}
    finally:
        serve_model(vllm_app, "LlavaForConditionalGeneration")


@pytest.mark.parametrize(("architecture", "registered", "forwarded"), [
    ("Gemma4ForConditionalGeneration", True, {"max_soft_tokens": 70}),
    # without the plugin, stock Gemma 4 would take any value, unchecked against the server's
    ("Gemma4ForConditionalGeneration", False, {}),
    ("LlavaForConditionalGeneration", True, {}),
])
def test_a_model_option_reaches_only_the_plugins_model_that_admits_it(vllm_app, monkeypatch, architecture,
                                                                       registered, forwarded):
    monkeypatch.setattr(plugin, "_registered", registered)
    body = {"messages": [], "mm_processor_kwargs": {"max_soft_tokens": 70, "images_kwargs": {"max_soft_tokens": 1}}}
    serve_model(vllm_app, architecture)
    try:
        status, _, downstream = guarded(vllm_app, body)
    finally:
        serve_model(vllm_app, "LlavaForConditionalGeneration")  # the module's app serves LLaVA
    assert status == 200
    kwargs = json.loads(downstream.body).get("mm_processor_kwargs", {})
    assert {key: value for key, value in kwargs.items() if not key.startswith("_textscythe")} == forwarded


def test_plugin_not_loaded_refuses_budgets(vllm_app, monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    status, payload, _ = guarded(vllm_app, {"visual_token_budget": 64})
    assert status == 400 and "not loaded" in json.loads(payload)["error"]["message"]


def test_media_route_without_processor_options_refuses_budgets(vllm_app):
    status, payload, downstream = guarded(vllm_app, {"messages": [], "visual_token_budget": 64}, "/v1/messages")
    error = json.loads(payload)["error"]
    assert status == 400 and error["param"] == "visual_token_budget" and "/v1/messages" in error["message"]
    status, _, downstream = guarded(vllm_app, {"messages": [], "media_io_kwargs": {"x": 1}}, "/v1/messages")
    assert status == 200 and json.loads(downstream.body) == {"messages": []}


def test_completions_validate_budgets_but_take_no_processor_kwargs(vllm_app):
    status, _, downstream = guarded(vllm_app, {"prompt": "x", "visual_token_budget": 64}, "/v1/completions")
    forwarded = json.loads(downstream.body)
    assert status == 200 and "visual_token_budget" not in json.dumps(forwarded)
    assert guarded(vllm_app, {"prompt": "x", "visual_token_budget": 0}, "/v1/completions")[0] == 400


# --- field validation ----------------------------------------------------------------------------------------
def test_client_cannot_forge_private_keys():
    forwarded = rewrite_payload({"mm_processor_kwargs": {"_textscythe_request": "x", "_textscythe_plans": [1]}})
    assert "mm_processor_kwargs" not in forwarded


def test_no_budget_means_no_mm_processor_kwargs():
    forwarded = rewrite_payload({"model": "m", "mm_processor_kwargs": {"size": 3}})
    assert "mm_processor_kwargs" not in forwarded


def test_only_the_served_models_admitted_options_pass(vllm_app):
    """Gemma 4's ``max_soft_tokens`` passes (its processor checks the value) where the route carries processor
    options; other keys are dropped, and a model without admitted options gets none."""
    from textscythe_vllm.plugin import REQUEST_PROCESSOR_OPTIONS
    from textscythe_vllm.routes import RouteTable

    gemma4 = REQUEST_PROCESSOR_OPTIONS["Gemma4ForConditionalGeneration"]
    kwargs = {"max_soft_tokens": 70, "images_kwargs": {"max_soft_tokens": 1120}, "size": 3}
    forwarded = rewrite_payload({"model": "m", "mm_processor_kwargs": dict(kwargs)}, model_options=gemma4)
    assert forwarded["mm_processor_kwargs"] == {"max_soft_tokens": 70}
    forwarded = rewrite_payload({"model": "m", "mm_processor_kwargs": dict(kwargs), "visual_token_budget": 9},
                                model_options=gemma4)
    assert forwarded["mm_processor_kwargs"] == {"max_soft_tokens": 70, "visual_token_budget": 9}
    assert "mm_processor_kwargs" not in rewrite_payload({"mm_processor_kwargs": dict(kwargs)})
    policies = {policy.path: policy for policy in RouteTable().guarded_paths(vllm_app)}
    dropped = rewrite_payload({"mm_processor_kwargs": dict(kwargs)}, policies["/v1/messages"], model_options=gemma4)
    assert "mm_processor_kwargs" not in dropped  # a route that takes no processor options


@pytest.mark.parametrize("value", [0, -1, 2.5, 64.0, True, "64", None, [1], {"a": 1}, 2**80])
def test_bad_budget_is_400_naming_the_field(vllm_app, value):
    status, payload, downstream = guarded(vllm_app, {"model": "m", "visual_token_budget": value})
    error = json.loads(payload)["error"]
    assert status == 400 and error["param"] == "visual_token_budget" and error["code"] == 400
    assert "visual_token_budget" in error["message"]
    assert downstream.body is None  # nothing reached vLLM


def test_bad_budget_inside_mm_processor_kwargs_is_also_400(vllm_app):
    status, payload, _ = guarded(vllm_app, {"mm_processor_kwargs": {"visual_token_budget": "x"}}, "/invocations")
    assert status == 400 and json.loads(payload)["error"]["param"] == "visual_token_budget"


def test_mm_processor_kwargs_must_be_an_object(vllm_app):
    status, payload, _ = guarded(vllm_app, {"mm_processor_kwargs": [1, 2]}, "/tokenize")
    assert status == 400 and json.loads(payload)["error"]["param"] == "mm_processor_kwargs"


def test_unknown_selector_is_400(vllm_app):
    status, payload, _ = guarded(vllm_app, {"visual_token_budget": 3, "visual_token_selector": "magic"})
    assert status == 400 and json.loads(payload)["error"]["param"] == "visual_token_selector"


# --- limits ------------------------------------------------------------------------------------------------------
def test_malformed_json_and_oversized_bodies(vllm_app):
    status, payload, _ = call(VisualTokenBudgetMiddleware(Downstream()), b"{oops", app=vllm_app)
    assert status == 400 and "JSON" in json.loads(payload)["error"]["message"]
    status, _, reads = call(VisualTokenBudgetMiddleware(Downstream(), max_body_bytes=100), b"x" * 101, app=vllm_app,
                            chunks=3)
    assert status == 413 and reads == 0  # the declared length is enough
    downstream = Downstream()
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 2

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": AUTH, "app": vllm_app}
    asyncio.run(VisualTokenBudgetMiddleware(downstream, max_body_bytes=100)(scope, receive, send))
    assert sent[0]["status"] == 413 and downstream.body is None  # no declared length: counted while streaming


def test_too_many_json_values_are_refused_before_parsing(vllm_app):
    body = b'{"messages":[' + b",".join([b"0"] * 2001) + b"]}"
    status, payload, _ = call(VisualTokenBudgetMiddleware(Downstream(), max_json_values=2000), body, app=vllm_app)
    assert status == 400 and "JSON values" in json.loads(payload)["error"]["message"]
    assert call(VisualTokenBudgetMiddleware(Downstream(), max_json_values=2003), body, app=vllm_app)[0] == 200


def test_deeply_nested_bodies_are_400(vllm_app):
    for depth in (65, 200, 969, 5000):
        body = b'{"messages":' + b"[" * depth + b"]" * depth + b"}"
        status, payload, _ = call(VisualTokenBudgetMiddleware(Downstream()), body, app=vllm_app)
        message = json.loads(payload)["error"]["message"]
        # Whether json.loads itself hits the recursion limit depends on the stack depth at hand; either way
        # the middleware answers, nothing reaches vLLM.
        assert status == 400 and ("nests deeper" in message or "recursion" in message)
        if depth <= 200:
            assert "nests deeper" in message
    ok = b'{"messages":' + b"[" * 30 + b"]" * 30 + b"}"
    assert call(VisualTokenBudgetMiddleware(Downstream()), ok, app=vllm_app)[0] == 200


def test_body_in_chunks_empty_bodies_and_non_objects(vllm_app):
    downstream = Downstream()
    body = json.dumps({"visual_token_budget": 5, "messages": ["x" * 500]}).encode()
    assert call(VisualTokenBudgetMiddleware(downstream), body, chunks=7, app=vllm_app)[0] == 200
    assert json.loads(downstream.body)["mm_processor_kwargs"]["visual_token_budget"] == 5
    # JSON that is not an object, and an empty body, are left for vLLM to answer.
    for raw in (b"[1,2]", b""):
        untouched = Downstream()
        call(VisualTokenBudgetMiddleware(untouched), raw, app=vllm_app)
        assert untouched.body == raw


def test_disconnect_after_body_reaches_the_app(vllm_app):
    downstream = Downstream()
    call(VisualTokenBudgetMiddleware(downstream), b"{}", app=vllm_app, wait_disconnect=True)
    assert downstream.after_body == [{"type": "http.disconnect"}]


def test_outside_an_app_every_post_is_guarded():
    downstream = Downstream()
    status, _, _ = call(VisualTokenBudgetMiddleware(downstream), b'{"visual_token_budget": 0}', "/anything")
    assert status == 400 and downstream.body is None
