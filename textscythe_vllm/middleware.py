"""``--middleware textscythe_vllm.middleware.VisualTokenBudgetMiddleware``: the HTTP face of the plugin.

Pure ASGI. The documented launch adds ``--trust-request-mm-kwargs``, which lets *every* route that reaches the
multimodal processor take per-request processor options; this middleware is what makes that safe. For every
``POST`` route of the app that can reach the processor (derived from the app's own routes, see
:mod:`textscythe_vllm.routes`, so new vLLM routes and ``--root-path`` prefixes are covered) it

* checks the API key first when the server has one (``--api-key`` / ``VLLM_API_KEY``), before reading the body
  -- also on ``/invocations`` and ``/tokenize``, which vLLM itself leaves open (``TEXTSCYTHE_API_KEY_ALL_ROUTES=0``
  restores vLLM's own scope);
* reads the body with a size limit and parses it off the event loop with a bounded element count;
* moves the top-level ``visual_token_budget`` / ``visual_token_selector`` fields into ``mm_processor_kwargs`` and
  validates them (HTTP 400 naming the field); a budget sent to a server whose model the plugin does not prune,
  or to a route that cannot carry it, is refused the same way rather than ignored;
* drops every other client-supplied ``mm_processor_kwargs`` key and all ``media_io_kwargs``, except the served
  model's own options the plugin admits (``plugin.REQUEST_PROCESSOR_OPTIONS``: Gemma 4's ``max_soft_tokens``),
  which its processor validates.

The multimodal processor applies the same allow-list again (defence in depth for offline and other frontends).
Responses, streamed or not, pass through untouched; after the body is read, ``receive`` is handed on so vLLM
still sees client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from textscythe_vllm import LOGGER_NAME, explain, metrics
from textscythe_vllm.processing import REQUEST_TAG_KEY
from textscythe_vllm.request import (
    BUDGET_FIELD,
    CLIENT_KEYS,
    EXPLAIN_FIELD,
    SELECTOR_FIELD,
    PruningRequestError,
    parse_budget,
    parse_explain,
    parse_selector,
)
from textscythe_vllm.routes import KWARGS_FIELD, REQUEST_ID_FIELD, RoutePolicy, RouteTable

logger = logging.getLogger(LOGGER_NAME)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MM_KWARGS_FIELD = KWARGS_FIELD
MEDIA_IO_FIELD = "media_io_kwargs"
#: Bodies nesting deeper than this are refused with 400 (chat requests nest about 6 levels).
MAX_JSON_DEPTH = 64
#: Bodies above this are refused with 413 before parsing (images travel base64-encoded inside the body).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Bodies with more JSON values than this are refused before parsing: memory and parse time grow with the
#: number of values, not with the bytes (a chat request with images has a few hundred).
DEFAULT_MAX_JSON_VALUES = 1_000_000
#: ``0`` limits the middleware's early key check to the paths vLLM itself guards (``/v1``, ``/v2``, ...).
API_KEY_ALL_ROUTES_ENV = "TEXTSCYTHE_API_KEY_ALL_ROUTES"
_VLLM_GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")


class RequestRejected(Exception):
    def __init__(self, status: int, message: str, param: str | None, error_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.error_type = status, message, param, error_type


def rewrite_payload(payload: dict[str, Any], policy: RoutePolicy | None = None,
                    refusal: str | None = None, model_options: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return the request body with only validated, allow-listed multimodal processor kwargs.

    ``refusal`` (why this server cannot prune) turns any plugin field into a 400; so does a route that takes
    media but cannot carry the budget (``policy.refuses_budget``). ``model_options``: the served model's own
    keys a request may set (validated by its processor); kept where the route carries processor options.
    """
    client_kwargs = payload.pop(MM_KWARGS_FIELD, None)
    if client_kwargs is not None and not isinstance(client_kwargs, dict):
        raise RequestRejected(400, f"'{MM_KWARGS_FIELD}' must be an object", MM_KWARGS_FIELD)
    allowed = {key: value for key, value in (client_kwargs or {}).items() if key in CLIENT_KEYS}
    options = {key: value for key, value in (client_kwargs or {}).items() if key in model_options}
    dropped = sorted(set(client_kwargs or {}) - set(allowed) - set(options))
    if dropped:
        logger.info("textscythe: dropped client-supplied %s keys %s", MM_KWARGS_FIELD, dropped)
    payload.pop(MEDIA_IO_FIELD, None)
    for key in CLIENT_KEYS:  # top-level fields win over the same key inside mm_processor_kwargs
        if key in payload:
            allowed[key] = payload.pop(key)
    try:
        if BUDGET_FIELD in allowed:
            parse_budget(allowed[BUDGET_FIELD])
        if SELECTOR_FIELD in allowed:
            parse_selector(allowed[SELECTOR_FIELD])
        if EXPLAIN_FIELD in allowed:
            parse_explain(allowed[EXPLAIN_FIELD])
    except PruningRequestError as error:
        raise RequestRejected(400, str(error), error.param) from None
    if allowed and refusal:
        field = next(key for key in CLIENT_KEYS if key in allowed)
        raise RequestRejected(400, f"'{field}' cannot be honoured: {refusal}", field)
    if allowed and policy is not None and policy.refuses_budget:
        field = next(key for key in CLIENT_KEYS if key in allowed)
        raise RequestRejected(
            400, f"'{field}' cannot be honoured on {policy.path}: this route takes images but no multimodal "
            "processor options; send the request to /v1/chat/completions or /v1/responses", field,
        )
    if (allowed or options) and (policy is None or policy.carries_budget):
        payload[MM_KWARGS_FIELD] = {**options, **allowed}
    return payload


class VisualTokenBudgetMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int | None = None, max_json_values: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes or int(
            os.environ.get("TEXTSCYTHE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)
        )
        self.max_json_values = max_json_values or int(
            os.environ.get("TEXTSCYTHE_MAX_JSON_VALUES", DEFAULT_MAX_JSON_VALUES)
        )
        self.key_on_all_routes = os.environ.get(API_KEY_ALL_ROUTES_ENV, "1") != "0"
        self._routes = RouteTable()
        self._server: _ServerFacts | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET" and _route_path(scope).startswith(
            explain.ROUTE_PREFIX
        ):
            await self._explanation(scope, send)
            return
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        policy = self._routes.policy_for(scope)
        if policy is None:
            await self.app(scope, receive, send)
            return
        server = self._server_facts(scope)
        try:
            if server.key_check is not None and self._needs_key(scope) and not server.key_check(scope):
                raise _unauthorized()
            self._check_declared_length(scope)
            body = await self._read_body(receive)
            headers = list(scope.get("headers", []))
            if body.strip():
                body, headers = await asyncio.to_thread(self._rewrite, body, headers, policy, server)
        except RequestRejected as rejection:
            await _send_error(send, rejection)
            return
        except _ClientGone:
            return
        scope = dict(scope)
        scope["headers"] = [(name, value) for name, value in headers if name.lower() != b"content-length"] + [
            (b"content-length", str(len(body)).encode())
        ]
        await self.app(scope, _replay(body, receive), send)

    async def _explanation(self, scope: Scope, send: Send) -> None:
        """``GET /v1/textscythe/explanations/{id}``: the same key rule as every ``/v1`` route."""
        server = self._server_facts(scope)
        if server.key_check is not None and not server.key_check(scope):
            await _send_error(send, _unauthorized())
            return
        request_id = urllib.parse.unquote(_route_path(scope)[len(explain.ROUTE_PREFIX):])
        record = await asyncio.to_thread(explain.lookup, request_id) if request_id else None
        if record is None:
            await _send_error(send, RequestRejected(
                404, f"no explanation for request '{request_id[:200]}': send the request with "
                "\"visual_token_explain\": true and a visual_token_budget (records are kept for the most recent "
                "requests only)", None, "NotFoundError"))
            return
        await _send_json(send, 200, record)

    def _server_facts(self, scope: Scope) -> _ServerFacts:
        if self._server is None or not self._server.complete:
            self._server = _ServerFacts.of(scope.get("app"))
        return self._server

    def _needs_key(self, scope: Scope) -> bool:
        return self.key_on_all_routes or _route_path(scope).startswith(_VLLM_GUARDED_PREFIXES)

    def _check_declared_length(self, scope: Scope) -> None:
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise self._too_large()

    def _too_large(self) -> RequestRejected:
        return RequestRejected(413, f"request body exceeds {self.max_body_bytes} bytes", None, "RequestTooLargeError")

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _rewrite(self, body: bytes, headers: list[tuple[bytes, bytes]], policy: RoutePolicy,
                 server: _ServerFacts) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """Parse, validate and rewrite one body (runs in a worker thread, off the event loop)."""
        payload = self._parse(body)
        if not isinstance(payload, dict):  # not a request object: vLLM answers it as usual
            return body, headers
        payload = rewrite_payload(payload, policy, server.refusal, server.model_options)
        if server.refusal is None and policy.carries_budget:
            headers = _announce_request(payload, headers, policy)
        return json.dumps(payload, separators=(",", ":")).encode(), headers

    def _parse(self, body: bytes) -> Any:
        # Every JSON value but the outermost is preceded by ',' '[' '{' or ':'; counting those bytes (at memory
        # speed) bounds the values json.loads would build before it builds any.
        values = body.count(b",") + body.count(b"[") + body.count(b"{")
        if values > self.max_json_values:
            raise RequestRejected(400, f"request body has more than {self.max_json_values} JSON values", None)
        try:
            payload = json.loads(body)
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integers longer than Python's
        # int_max_str_digits (a 5,000-digit number), which json.loads raises as a plain ValueError.
        except (ValueError, RecursionError) as error:
            raise RequestRejected(400, f"request body is not valid JSON: {error}", None) from None
        if _nesting_depth(payload) > MAX_JSON_DEPTH:
            # Deeper bodies parse, but re-serialising them here or validating them in vLLM recurses past
            # Python's limit; no OpenAI request nests anywhere near this deep.
            raise RequestRejected(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", None)
        return payload


class _ServerFacts:
    """What the middleware needs to know about the server it runs in, read from the app once it is set up."""

    def __init__(self, key_check: Callable[[Scope], bool] | None, refusal: str | None, complete: bool,
                 model_options: tuple[str, ...] = ()) -> None:
        self.key_check, self.refusal, self.complete = key_check, refusal, complete
        self.model_options = model_options

    @classmethod
    def of(cls, app: Any) -> _ServerFacts:
        from textscythe_vllm._vllm import api_key_check, served_model
        from textscythe_vllm.plugin import MODEL_CLASSES, REQUEST_PROCESSOR_OPTIONS, plugin_registered

        if app is None:  # outside a Starlette app (unit tests of the rewrite): nothing to learn
            return cls(None, None, complete=True)
        key_check = api_key_check(app)
        model = served_model(app)
        if model is None:  # the app's state is set up in its lifespan; look again on the next request
            return cls(key_check, None, complete=False)
        name, architecture = model
        refusal = None
        if not plugin_registered():
            refusal = (f"the textscythe plugin is not loaded in this server (model '{name}', architecture "
                       f"{architecture}); check VLLM_PLUGINS")
        elif architecture not in MODEL_CLASSES:
            refusal = (f"model '{name}' (architecture {architecture}) is not pruned by textscythe-vllm, which "
                       f"supports {', '.join(MODEL_CLASSES)}")
        options = () if refusal else REQUEST_PROCESSOR_OPTIONS.get(architecture, ())
        return cls(key_check, refusal, complete=True, model_options=options)


def _unauthorized() -> RequestRejected:
    return RequestRejected(401, "Unauthorized: a valid API key is required", None, "AuthenticationError")


def _announce_request(payload: dict[str, Any], headers: list[tuple[bytes, bytes]],
                      policy: RoutePolicy) -> list[tuple[bytes, bytes]]:
    """Give the processor a ticket naming the ids vLLM will report this request under, so its latency can be
    filed under its budget bucket. vLLM's ids stay vLLM's: an id the client sent (``X-Request-Id`` or the body's
    ``request_id``) is used as it is, and a missing one is drawn from the route's own request model (so
    ``/v1/responses`` keeps its ``resp_`` ids); a raw-body route gets an ``X-Request-Id`` header instead."""
    request_ids = [value.decode("latin-1") for name, value in headers if name.lower() == b"x-request-id"]
    body_id = payload.get(REQUEST_ID_FIELD)
    if policy.request_id_factory is not None:
        if not isinstance(body_id, str) or not body_id:
            body_id = payload[REQUEST_ID_FIELD] = policy.request_id_factory()
        request_ids.append(body_id)
    elif not request_ids:
        header_id = uuid.uuid4().hex
        headers = [*headers, (b"x-request-id", header_id.encode())]
        request_ids.append(header_id)
    kwargs = payload.setdefault(MM_KWARGS_FIELD, {})
    kwargs[REQUEST_TAG_KEY] = metrics.REQUEST_BUCKETS.announce(request_ids)
    return headers


def _route_path(scope: Scope) -> str:
    """The request's path without the app's ``--root-path`` prefix (as vLLM's own key check reads it)."""
    return scope["path"].removeprefix(scope.get("root_path", ""))


def _nesting_depth(value: Any) -> int:
    """Deepest nesting of lists/objects in a parsed JSON value (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class _ClientGone(Exception):
    pass


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send: Send, rejection: RequestRejected) -> None:
    await _send_json(send, rejection.status, {
        "error": {
            "message": rejection.message, "type": rejection.error_type, "param": rejection.param,
            "code": rejection.status,
        }
    })


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
