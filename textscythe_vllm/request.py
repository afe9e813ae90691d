"""The request fields the plugin understands, and their validation.

Shared by the HTTP middleware (which answers HTTP 400) and the multimodal processor (which raises
``ValueError``, the error vLLM reports for offline ``LLM`` prompts and, online, as HTTP 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from textscythe_vllm.selectors import available_selectors

BUDGET_FIELD = "visual_token_budget"
SELECTOR_FIELD = "visual_token_selector"
#: ``true`` asks for the request's selection to be kept for ``GET /v1/textscythe/explanations/{id}``.
EXPLAIN_FIELD = "visual_token_explain"
#: Keys a client may set in ``mm_processor_kwargs`` (directly or through the top-level fields).
CLIENT_KEYS = (BUDGET_FIELD, SELECTOR_FIELD, EXPLAIN_FIELD)
DEFAULT_SELECTOR = "textscythe"
#: Budgets above this are refused: no supported model produces more visual tokens per item, and absurd values
#: (2**63, 1e300 as int) must not reach tensor constructors.
MAX_BUDGET = 1 << 20


class PruningRequestError(ValueError):
    """A bad ``visual_token_*`` value; ``param`` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_budget(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PruningRequestError(
            BUDGET_FIELD,
            f"'{BUDGET_FIELD}' must be an integer >= 1 (visual tokens kept per image), "
            f"got {value!r} of type {type(value).__name__}",
        )
    if not 1 <= value <= MAX_BUDGET:
        raise PruningRequestError(
            BUDGET_FIELD, f"'{BUDGET_FIELD}' must be an integer between 1 and {MAX_BUDGET}, got {value}"
        )
    return value


def parse_selector(value: object) -> str:
    names = available_selectors()
    if not isinstance(value, str) or value not in names:
        raise PruningRequestError(
            SELECTOR_FIELD, f"'{SELECTOR_FIELD}' must be one of {names}, got {value!r}"
        )
    return value


def parse_explain(value: object) -> bool:
    if not isinstance(value, bool):
        raise PruningRequestError(EXPLAIN_FIELD, f"'{EXPLAIN_FIELD}' must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class PruningRequest:
    """What a request asks for: ``budget`` visual tokens per image, chosen by ``selector``; ``explain`` keeps the
    selection for the explain route."""

    budget: int
    selector: str = DEFAULT_SELECTOR
    explain: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object]) -> PruningRequest | None:
        """Read the plugin's keys from merged ``mm_processor_kwargs``; ``None`` when no budget is set.

        A selector without a budget is validated but prunes nothing (a budget is what asks for pruning).
        """
        selector = parse_selector(kwargs[SELECTOR_FIELD]) if SELECTOR_FIELD in kwargs else DEFAULT_SELECTOR
        explain = parse_explain(kwargs[EXPLAIN_FIELD]) if EXPLAIN_FIELD in kwargs else False
        if BUDGET_FIELD not in kwargs:
            return None
        return cls(budget=parse_budget(kwargs[BUDGET_FIELD]), selector=selector, explain=explain)
