"""Visual-token selectors behind one interface.

>>> from textscythe_vllm.selectors import get_selector, available_selectors
>>> selector = get_selector("textscythe", alpha=0.7)
>>> out = selector.select(visual, text, attention, budget)  # doctest: +SKIP
"""

from __future__ import annotations

from textscythe_vllm.selectors.base import Selection, SelectionResult, TokenSelector
from textscythe_vllm.selectors.cls_attention import ClsAttentionSelector
from textscythe_vllm.selectors.dart import DartSelector
from textscythe_vllm.selectors.divprune import DivPruneSelector
from textscythe_vllm.selectors.icctp import IcctpSelector
from textscythe_vllm.selectors.random_selector import RandomSelector
from textscythe_vllm.selectors.textscythe import TextScytheSelector, entropy_ratio
from textscythe_vllm.selectors.uniform import UniformSelector
from textscythe_vllm.selectors.visiondrop import VisionDropSelector
from textscythe_vllm.selectors.visionzip import VisionZipSelector

_SELECTORS: dict[str, type[TokenSelector]] = {
    cls.name: cls
    for cls in (
        TextScytheSelector,
        RandomSelector,
        UniformSelector,
        ClsAttentionSelector,
        DivPruneSelector,
        DartSelector,
        VisionZipSelector,
        IcctpSelector,
        VisionDropSelector,
    )
}


def available_selectors() -> list[str]:
    """Names accepted by :func:`get_selector` (and by the ``visual_token_selector`` request field)."""
    return sorted(_SELECTORS)


def get_selector(name: str, **hyper_parameters: object) -> TokenSelector:
    """Build the selector ``name`` with the given hyper-parameters (its dataclass fields).

    Raises ``ValueError`` for an unknown name or an unknown/invalid hyper-parameter.
    """
    try:
        cls = _SELECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selector {name!r}; available: {', '.join(available_selectors())}") from None
    try:
        return cls(**hyper_parameters)
    except TypeError as error:
        raise ValueError(f"invalid hyper-parameters for selector {name!r}: {error}") from None


__all__ = [
    "Selection",
    "SelectionResult",
    "TokenSelector",
    "available_selectors",
    "entropy_ratio",
    "get_selector",
]
