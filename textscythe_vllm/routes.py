"""Which HTTP routes the middleware guards, derived from the routes the running vLLM app registered.

vLLM adds routes from release to release (``/invocations``, ``/v1/chat/completions/batch``, ``/tokenize``, the
render routes, ...), and every one whose request reaches the multimodal processor is opened to clients by
``--trust-request-mm-kwargs``. A hand-kept list of paths falls behind; instead each ``POST`` route of the app is
classified once from what FastAPI knows about it -- the pydantic model(s) of its body:

* a body model with ``messages``, ``prompt``, ``input`` or ``mm_processor_kwargs`` can carry media or processor
  options: the middleware reads and rewrites the body (and, with an API key set, checks the key first);
* a route without a body model reads the raw request and dispatches by body shape (SageMaker's
  ``/invocations`` becomes a chat or completion request): it is treated like a chat route -- unless the same
  path also answers ``GET`` (a probe such as ``/ping``), which stays open and untouched;
* a body model with ``mm_processor_kwargs`` (or a raw body) carries ``visual_token_budget`` to the processor; a
  model with ``messages`` but no such field (Anthropic ``/v1/messages``) takes images but cannot carry a budget,
  so a budget sent there is refused rather than ignored.

The route is found the way Starlette routes the request (``route.matches``), so ``--root-path`` prefixes,
path parameters and mounts behave exactly as in vLLM.
"""

from __future__ import annotations

import threading
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: Body-model fields through which a request can reach the multimodal processor.
_MEDIA_FIELDS = frozenset({"messages", "prompt", "input", "mm_processor_kwargs"})
KWARGS_FIELD = "mm_processor_kwargs"
REQUEST_ID_FIELD = "request_id"


@dataclass(frozen=True)
class RoutePolicy:
    """What the middleware does for one ``POST`` route."""

    path: str
    #: The budget reaches the processor (the body model has ``mm_processor_kwargs``, or the body is raw).
    carries_budget: bool
    #: The route takes media but cannot carry a budget: a budget sent here is refused.
    refuses_budget: bool
    #: Draws a fresh request id the way the route's body model would (``resp_...`` for responses), or ``None``
    #: when the route has no ``request_id`` field (then the id travels in the ``X-Request-Id`` header).
    request_id_factory: Callable[[], str] | None


#: Used when the middleware runs outside a Starlette app (no routes to derive from): guard everything.
GUARD_EVERYTHING = RoutePolicy("*", carries_budget=True, refuses_budget=False, request_id_factory=None)


def body_models(route: Any) -> list[type]:
    """The pydantic model(s) of a FastAPI route's body (unions flattened); ``[]`` for a raw-request endpoint."""
    field = getattr(route, "body_field", None)
    if field is None:
        return []
    return [model for model in _flatten(field.field_info.annotation) if hasattr(model, "model_fields")]


def _flatten(annotation: Any) -> Iterable[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            yield from _flatten(member)
    elif origin is typing.Annotated:
        yield from _flatten(typing.get_args(annotation)[0])
    else:
        yield annotation


def classify(route: Any, get_paths: frozenset[str]) -> RoutePolicy | None:
    """The policy of a ``POST`` route, or ``None`` when the middleware leaves it alone."""
    models = body_models(route)
    path = route.path
    if not models:
        if getattr(route, "body_field", None) is not None or path in get_paths:
            return None
        return RoutePolicy(path, carries_budget=True, refuses_budget=False, request_id_factory=None)
    fields = {name: info for model in models for name, info in model.model_fields.items()}
    if not _MEDIA_FIELDS & fields.keys():
        return None
    id_field = fields.get(REQUEST_ID_FIELD)
    factory = getattr(id_field, "default_factory", None) if id_field is not None else None
    carries = KWARGS_FIELD in fields
    return RoutePolicy(path, carries_budget=carries, refuses_budget=not carries and "messages" in fields,
                       request_id_factory=factory)


class RouteTable:
    """The app's guarded routes, classified once (on the first request, when every router is attached)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._table: list[tuple[Any, RoutePolicy | None]] | None = None

    def policy_for(self, scope: dict[str, Any]) -> RoutePolicy | None:
        """The policy of the route Starlette would give this ``POST`` request (``None``: leave it alone)."""
        app = scope.get("app")
        routes = getattr(getattr(app, "router", None), "routes", None)
        if routes is None:
            return GUARD_EVERYTHING
        from starlette.routing import Match

        for route, policy in self._classified(routes):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return policy
        return None

    def _classified(self, routes: list[Any]) -> list[tuple[Any, RoutePolicy | None]]:
        with self._guard:
            if self._table is None:
                get_paths = frozenset(
                    getattr(route, "path", "") for route in routes if "GET" in (getattr(route, "methods", None) or ())
                )
                self._table = [
                    (route, classify(route, get_paths) if "POST" in (getattr(route, "methods", None) or ()) else None)
                    for route in routes
                ]
            return self._table

    def guarded_paths(self, app: Any) -> list[RoutePolicy]:
        """Every guarded route of ``app`` (for logs and tests)."""
        return [policy for _, policy in self._classified(app.router.routes) if policy is not None]
