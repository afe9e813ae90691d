"""``--middleware textscythe_vllm.middleware.VisualTokenBudgetMiddleware``: the HTTP face of the plugin.

Pure ASGI. For ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` it

* moves the top-level ``visual_token_budget`` / ``visual_token_selector`` fields into ``mm_processor_kwargs``
  (where vLLM hands them to the multimodal processor; the server needs ``--trust-request-mm-kwargs``);
* validates them and answers HTTP 400 with an OpenAI-style error body naming the field;
* drops every other client-supplied ``mm_processor_kwargs`` key and all ``media_io_kwargs`` -- the trust flag
  would otherwise let clients set any HF-processor option.

Responses, streamed or not, pass through untouched; after the body is read, ``receive`` is handed on so vLLM
still sees client disconnects.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from textscythe_vllm import LOGGER_NAME
from textscythe_vllm.processing import REQUEST_TAG_KEY
from textscythe_vllm.request import (
    BUDGET_FIELD,
    CLIENT_KEYS,
    SELECTOR_FIELD,
    PruningRequestError,
    parse_budget,
    parse_selector,
)

logger = logging.getLogger(LOGGER_NAME)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REWRITTEN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
MM_KWARGS_FIELD = "mm_processor_kwargs"
MEDIA_IO_FIELD = "media_io_kwargs"
#: Bodies nesting deeper than this are refused with 400 (chat requests nest about 6 levels).
MAX_JSON_DEPTH = 64
#: Bodies above this are refused with 413 before parsing (images travel base64-encoded inside the body).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class RequestRejected(Exception):
    def __init__(self, status: int, message: str, param: str | None, error_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.error_type = status, message, param, error_type


def rewrite_payload(payload: dict[str, Any], request_tag: str | None = None) -> dict[str, Any]:
    """Return the request body with only validated, allow-listed multimodal processor kwargs.

    ``request_tag`` (the id vLLM will report the request under) is passed to the processor so the request's
    latency can be attributed to its budget bucket.
    """
    client_kwargs = payload.pop(MM_KWARGS_FIELD, None)
    if client_kwargs is not None and not isinstance(client_kwargs, dict):
        raise RequestRejected(400, f"'{MM_KWARGS_FIELD}' must be an object", MM_KWARGS_FIELD)
    allowed = {key: value for key, value in (client_kwargs or {}).items() if key in CLIENT_KEYS}
    dropped = sorted(set(client_kwargs or {}) - set(allowed))
    if dropped:
        logger.info("textscythe: dropped client-supplied %s keys %s", MM_KWARGS_FIELD, dropped)
    for key in CLIENT_KEYS:  # top-level fields win over the same key inside mm_processor_kwargs
        if key in payload:
            allowed[key] = payload.pop(key)
    try:
        if BUDGET_FIELD in allowed:
            parse_budget(allowed[BUDGET_FIELD])
        if SELECTOR_FIELD in allowed:
            parse_selector(allowed[SELECTOR_FIELD])
    except PruningRequestError as error:
        raise RequestRejected(400, str(error), error.param) from None
    payload.pop(MEDIA_IO_FIELD, None)
    if request_tag:
        allowed[REQUEST_TAG_KEY] = request_tag
    if allowed:
        payload[MM_KWARGS_FIELD] = allowed
    return payload


class VisualTokenBudgetMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes or int(
            os.environ.get("TEXTSCYTHE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in REWRITTEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
            payload = self._parse(body)
            if isinstance(payload, dict):
                tag = _request_tag(scope, payload)
                body = json.dumps(rewrite_payload(payload, tag), separators=(",", ":")).encode()
        except RequestRejected as rejection:
            await _send_error(send, rejection)
            return
        except _ClientGone:
            return
        scope = dict(scope)
        scope["headers"] = [
            (name, value) for name, value in scope.get("headers", []) if name.lower() != b"content-length"
        ] + [(b"content-length", str(len(body)).encode())]
        await self.app(scope, _replay(body, receive), send)

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
                raise RequestRejected(
                    413, f"request body exceeds {self.max_body_bytes} bytes", None, "RequestTooLargeError"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _parse(body: bytes) -> Any:
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


def _request_tag(scope: Scope, payload: dict[str, Any]) -> str:
    """The base id vLLM will give the request: the X-Request-Id header, else the body's ``request_id`` (set to
    a fresh one here when absent)."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            return value.decode("latin-1")
    request_id = payload.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        request_id = payload["request_id"] = uuid.uuid4().hex
    return request_id


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
    body = json.dumps(
        {
            "error": {
                "message": rejection.message,
                "type": rejection.error_type,
                "param": rejection.param,
                "code": rejection.status,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": rejection.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
