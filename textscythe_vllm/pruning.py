"""Model-side glue: the one ``embed_multimodal`` of every family, and the choice of each item's rows.

The invariant this module protects: ``embed_multimodal`` returns exactly as many rows per item as the
processor gave it placeholders -- ``min(budget, N)``. vLLM kills the engine on fewer rows and silently
truncates more, so every failure in selection falls back to a deterministic choice of the right size.

The contract with a family (:class:`PruningModel`): the family says how many items a parsed input holds and
encodes them into :class:`EncodedItems` -- features, attention, layout -- and, where its LLM has M-RoPE, places
the kept rows (:meth:`PruningModel.place_rows`). Everything else -- plans, which selector reads what, selection,
fallbacks, explanations, the stock path for batches without a budget -- is here, once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, _vllm, explain, metrics
from textscythe_vllm.processing import ItemPlan, plan_field, spread_budget
from textscythe_vllm.selectors import TokenSelector, get_selector
from textscythe_vllm.selectors.textscythe import entropy_ratio

logger = logging.getLogger(LOGGER_NAME)

#: Test hook (reliability tests): when set to "1", every selection raises inside the guarded region, which
#: must end in the deterministic fallback, never in a dead engine.
FAULT_INJECTION_ENV = "TEXTSCYTHE_FAIL_SELECTION"
FALLBACK_SELECTOR = "uniform"
#: When set to a file path, every pruned item appends its kept positions there (JSON lines).
SELECTION_LOG_ENV = "TEXTSCYTHE_SELECTION_LOG"


@cache
def selector_instance(name: str) -> TokenSelector:
    return get_selector(name)


def needs_attention(plans: Sequence[ItemPlan]) -> bool:
    """Whether any plan's selector reads the tower's attention: if none does, the probe is not run."""
    return any(plan.budget and selector_instance(plan.selector).uses_attention for plan in plans)


def decode_plans(packed: object, num_items: int) -> list[ItemPlan] | None:
    """Plans from the :data:`~textscythe_vllm.processing.PLAN_FIELD` batch (a stacked tensor or a list)."""
    if packed is None:
        return None
    rows = list(packed.unbind(0)) if isinstance(packed, Tensor) else list(packed)  # type: ignore[call-overload]
    if len(rows) != num_items:
        raise RuntimeError(f"textscythe: {len(rows)} pruning plans for {num_items} items")
    plans = [ItemPlan.decode(row) for row in rows]
    return plans if any(plan.budget for plan in plans) else None


def choose_rows(
    features: Tensor,  # [M, D] one item's projected visual tokens, in placeholder order
    attention: Tensor | None,  # [M] attention each row receives in the vision tower, or None
    text: Tensor,  # [T, D] instruction-token embeddings
    plan: ItemPlan,
    candidates: Tensor | None = None,  # [M] bool: rows that carry image content (False: layout tokens)
    extra_seconds: float = 0.0,  # selection work done earlier for this item (its share of attention probing)
) -> Tensor:
    """The ``[min(budget, M), D]`` rows to feed the LLM, in position order; never raises, never another count.

    See :func:`choose_rows_and_positions`, which also returns where each row stands.
    """
    return choose_rows_and_positions(features, attention, text, plan, candidates, extra_seconds)[0]


def choose_rows_and_positions(
    features: Tensor,
    attention: Tensor | None,
    text: Tensor,
    plan: ItemPlan,
    candidates: Tensor | None = None,
    extra_seconds: float = 0.0,
    layout: dict[str, Any] | None = None,  # how the rows lie on the item (explanations); default: square grid
    segments: Sequence[int] | None = None,  # row counts of the item's segments (video frames), summing to M
) -> tuple[Tensor, Tensor]:
    """``(rows [min(budget, M), D], positions [min(budget, M)])``: the rows to feed the LLM, in position order,
    and the ascending row index in ``features`` each one stands at (a merged row stands at its selector's
    index); never raises, never another count.

    Pruning selectors return kept rows; merging selectors (visionzip, visiondrop) return merged rows. Layout
    rows (LLaVA-NeXT's newline tokens) are not selected while image rows remain; when the budget exceeds the
    image rows, the earliest layout rows fill the rest so the count still matches the placeholders. An item in
    ``segments`` keeps :func:`~textscythe_vllm.processing.spread_budget` rows of each, chosen within it.
    """
    num_rows = features.shape[0]
    keep = min(plan.budget, num_rows)
    if keep == num_rows:
        everything = torch.arange(num_rows, device=features.device)
        if plan.explain_id:
            _explain_selection(plan, features, text, everything, {}, None, 0.0, layout)
        return features, everything
    started = time.perf_counter()
    layout_matches = candidates is None or candidates.shape[0] == num_rows
    try:
        if os.environ.get(FAULT_INJECTION_ENV) == "1":
            raise RuntimeError(f"selection failure injected by {FAULT_INJECTION_ENV}=1")
        if not layout_matches or (attention is not None and attention.shape[0] != num_rows):
            raise RuntimeError(
                f"attention ({None if attention is None else attention.shape[0]}) or layout "
                f"({None if candidates is None else candidates.shape[0]}) rows differ from the {num_rows} features"
            )
        if segments is not None and sum(segments) != num_rows:
            raise RuntimeError(f"segments of {sum(segments)} rows for {num_rows} features")
        positions, rows, info = _select_segments(features, attention, text, plan.selector, keep, candidates, segments)
        if rows.shape != (keep, features.shape[1]):
            raise RuntimeError(f"selector {plan.selector!r} returned {tuple(rows.shape)}, expected {keep} rows")
        fallback = None
    except Exception:
        logger.exception("textscythe: selector %r failed; falling back to %r", plan.selector, FALLBACK_SELECTOR)
        metrics.record_fallback(plan.selector)
        info, fallback = {}, FALLBACK_SELECTOR
        segments = segments if segments is not None and sum(segments) == num_rows else None
        try:
            positions, rows, _ = _select_segments(
                features, None, text[:0], FALLBACK_SELECTOR, keep, candidates if layout_matches else None, segments
            )
        except Exception:
            logger.exception("textscythe: fallback selector failed; keeping the first %d rows", keep)
            positions = _first_rows(keep, segments, features.device)
            rows, fallback = features[positions], "first_rows"
    seconds = time.perf_counter() - started + extra_seconds
    metrics.record_selection(plan.selector, seconds)
    _log_selection(plan, num_rows, positions)
    if plan.explain_id:
        _explain_selection(plan, features, text, positions, info, fallback, seconds, layout)
    return rows, positions


def _explain_selection(plan: ItemPlan, features: Tensor, text: Tensor, positions: Tensor, info: dict[str, Tensor],
                       fallback: str | None, seconds: float, layout: dict[str, Any] | None) -> None:
    """The worker's part of an explanation (see :mod:`textscythe_vllm.explain`). Never raises."""
    try:
        key_mask = info.get("key_text_mask")
        relevant = info.get("relevant_mask")
        ratios = entropy_ratio(text, features).tolist() if text.shape[0] else []
        explain.record_item(plan.explain_id, {
            "selector": plan.selector, "budget": plan.budget, "num_tokens": features.shape[0],
            "kept": int(positions.shape[0]), "kept_positions": positions.tolist(),
            "layout": layout or explain.grid_layout(features.shape[0]),
            "entropy_ratio": [round(ratio, 6) for ratio in ratios],
            "key_token_indices": [] if key_mask is None else key_mask.nonzero().flatten().tolist(),
            "relevant": None if relevant is None else int(relevant.sum()),
            "fallback": fallback, "selector_seconds": round(seconds, 6),
        })
    except Exception:
        logger.warning("textscythe: could not record the explanation of a selection", exc_info=True)


def _log_selection(plan: ItemPlan, num_rows: int, positions: Tensor) -> None:
    """Append the kept positions to ``$TEXTSCYTHE_SELECTION_LOG`` (JSON lines), for debugging and the demo."""
    path = os.environ.get(SELECTION_LOG_ENV)
    if not path:
        return
    record = {
        "selector": plan.selector, "budget": plan.budget, "num_tokens": num_rows,
        "instruction_tokens": len(plan.instruction), "kept_positions": positions.tolist(),
    }
    try:
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")
    except OSError:
        logger.warning("textscythe: cannot write the selection log %s", path, exc_info=True)


def _first_rows(keep: int, segments: Sequence[int] | None, device: torch.device) -> Tensor:
    """``[keep]``: the first rows of the item, or of each segment by its quota."""
    if segments is None:
        return torch.arange(keep, device=device)
    starts = [sum(segments[:index]) for index in range(len(segments))]
    return torch.cat([torch.arange(start, start + quota, device=device)
                      for start, quota in zip(starts, spread_budget(keep, segments), strict=True)])


def _select_segments(
    features: Tensor, attention: Tensor | None, text: Tensor, selector: str, keep: int, candidates: Tensor | None,
    segments: Sequence[int] | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`_select` over the whole item, or within each segment for its quota (positions stay item-wide)."""
    if segments is None or len(segments) == 1:
        return _select(features, attention, text, selector, keep, candidates)
    positions, rows, info, start = [], [], {}, 0
    for size, quota in zip(segments, spread_budget(keep, segments), strict=True):
        part = slice(start, start + size)
        if quota:
            segment_positions, segment_rows, segment_info = _select(
                features[part], None if attention is None else attention[part], text, selector, quota,
                None if candidates is None else candidates[part],
            )
            positions.append(segment_positions + start)
            rows.append(segment_rows)
            info = info or {key: value for key, value in segment_info.items() if key == "key_text_mask"}
        start += size
    return torch.cat(positions), torch.cat(rows), info


def _select(
    features: Tensor, attention: Tensor | None, text: Tensor, selector: str, keep: int, candidates: Tensor | None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(positions [keep], rows [keep, D], the selector's diagnostics)`` in position order."""
    if candidates is None:
        result = selector_instance(selector).select(features, text, attention, keep)
        return result.indices, result.embeddings, result.info
    content_rows = candidates.nonzero().squeeze(1)  # [C]
    num_content = content_rows.shape[0]
    result = selector_instance(selector).select(
        features[content_rows], text, None if attention is None else attention[content_rows], min(keep, num_content)
    )
    positions, rows = content_rows[result.indices], result.embeddings
    if keep > num_content:
        layout_rows = (~candidates).nonzero().squeeze(1)[: keep - num_content]
        positions = torch.cat([positions, layout_rows])
        rows = torch.cat([rows, features[layout_rows]])
    order = torch.argsort(positions)
    return positions[order], rows[order], result.info


def prune_items(
    features: Sequence[Tensor],  # per item [M_i, D]
    attention: Sequence[Tensor | None],  # per item [M_i] or None
    plans: Sequence[ItemPlan],
    embed_tokens: Callable[[Tensor], Tensor],  # instruction ids [T] -> embeddings [T, D]
    candidates: Sequence[Tensor | None] | None = None,
    attention_seconds: float = 0.0,  # time spent computing ``attention`` for the whole batch
    layouts: Sequence[dict[str, Any] | None] | None = None,  # per item, for explanations
) -> list[Tensor]:
    """Apply each item's plan; unpruned items (budget 0 or >= their token count) come back unchanged."""
    return [rows for rows, _ in prune_items_with_positions(
        features, attention, plans, embed_tokens, candidates, attention_seconds, layouts
    )]


def explaining(plans: Sequence[ItemPlan]) -> bool:
    """Whether any item of the batch is explained (family modules then describe their items' layouts)."""
    return any(plan.explain_id for plan in plans)


def prune_items_with_positions(
    features: Sequence[Tensor],
    attention: Sequence[Tensor | None],
    plans: Sequence[ItemPlan],
    embed_tokens: Callable[[Tensor], Tensor],
    candidates: Sequence[Tensor | None] | None = None,
    attention_seconds: float = 0.0,
    layouts: Sequence[dict[str, Any] | None] | None = None,  # per item, for explanations
    segments: Sequence[Sequence[int] | None] | None = None,  # per item: row counts of its segments, or None
) -> list[tuple[Tensor, Tensor | None]]:
    """:func:`prune_items` with each pruned item's kept positions (``[K]`` ascending row indices of its
    features); ``None`` for an item that comes back unchanged."""
    pruned_items = sum(1 for item, plan in zip(features, plans, strict=True) if 0 < plan.budget < item.shape[0])
    share = attention_seconds / pruned_items if pruned_items else 0.0
    pruned: list[tuple[Tensor, Tensor | None]] = []
    for index, (item, plan) in enumerate(zip(features, plans, strict=True)):
        if not 0 < plan.budget < item.shape[0]:
            if plan.explain_id:  # the budget keeps every row: the explanation says so
                _explain_selection(plan, item, item.new_zeros((0, item.shape[1])),
                                   torch.arange(item.shape[0], device=item.device), {}, None, 0.0,
                                   None if layouts is None else layouts[index])
            pruned.append((item, None))
            continue
        # a selector that does not read the instruction gets none (no embedding lookup); explanations still show
        # the words the processor recorded
        ids = torch.tensor(plan.instruction if selector_instance(plan.selector).uses_text else (),
                           dtype=torch.long, device=item.device)
        text = embed_tokens(ids) if ids.numel() else item.new_zeros((0, item.shape[1]))
        pruned.append(choose_rows_and_positions(
            item, attention[index], text, plan, None if candidates is None else candidates[index], share,
            None if layouts is None else layouts[index], None if segments is None else segments[index],
        ))
    return pruned


@dataclass
class EncodedItems:
    """One modality's items of a batch, as a family hands them to :class:`PruningModel`."""

    features: list[Tensor]  # per item [M_i, D], in placeholder order
    attention: list[Tensor | None]  # per item [M_i]: attention each row receives in the tower, or None
    candidates: list[Tensor | None] | None = None  # per item [M_i] bool: content rows (False: layout rows)
    layouts: list[dict[str, Any] | None] | None = None  # per item: how rows lie on the item (explanations)
    attention_seconds: float = 0.0  # time spent computing ``attention`` for the whole batch
    #: per item: row counts of its segments -- runs of placeholders the prompt separates by text it keeps (a
    #: video's frames between timestamps), each pruned to its share of the budget; None: one run
    segments: list[list[int] | None] | None = None
    #: per item ``[M_i, C]`` columns that travel with each row but are not selected on (Qwen3-VL's DeepStack
    #: levels): a kept row keeps its own; a merged row keeps its selector index's
    carried: list[Tensor] | None = None


class PruningModel:
    """The single ``embed_multimodal`` of every family (put in front of vLLM's model class).

    It pops each pruned modality's plan field, parses the inputs with the model's own parsing (whose order -- the
    kwargs order -- is the order vLLM expects the items in) and, for each modality whose items carry plans, asks
    the family to :meth:`encode_items` (with attention only when a plan's selector reads it, with layouts only
    when an item is explained), selects each item's rows and lets the family :meth:`place_rows`. A batch without
    any budget takes the parent class's path unchanged; a modality without plans gets the stock features.

    A family module supplies :meth:`count_items` and :meth:`encode_items` (and :meth:`place_rows` /
    :meth:`pruning_enabled` where it needs them).
    """

    pruned_modalities: tuple[str, ...] = ("image",)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        metrics.setup_worker_metrics(vllm_config.model_config.served_model_name)

    # -- what a family supplies -----------------------------------------------------------------------------
    def pruning_enabled(self) -> bool:
        """``False`` when the model runs a server-wide mode that owns its rows (e.g. vLLM's EVS)."""
        return True

    def count_items(self, modality: str, modality_input: Any) -> int:
        """Items in one modality's parsed input (default: the per-item batch of LLaVA-style inputs)."""
        return len(modality_input[ITEMS_KEY[modality_input["type"]]])

    def encode_items(self, modality: str, modality_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        raise NotImplementedError

    def place_rows(self, modality: str, modality_input: Any, index: int, rows: Tensor, kept: Tensor) -> Tensor:
        """The rows ``embed_multimodal`` returns for pruned item ``index`` (``kept``: their ascending row indices
        in the item's features); M-RoPE families attach positions here."""
        return rows

    def stock_features(self, modality: str, modality_input: Any) -> list[Tensor]:
        """The model's own tower + projector on one modality's parsed input, one ``[M_i, D]`` tensor per item."""
        encode = _vllm.image_features if modality == "image" else _vllm.video_features
        return list(encode(self, modality_input))

    # -- the one path ---------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> Any:
        packed = {modality: kwargs.pop(plan_field(modality), None) for modality in self.pruned_modalities}
        if not self.pruning_enabled() or all(value is None for value in packed.values()):
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        inputs = _vllm.parse_multimodal_inputs(self, **kwargs)
        plans = {
            modality: decode_plans(packed.get(modality), self.count_items(modality, modality_input))
            for modality, modality_input in inputs.items()
            if modality_input is not None
        }
        if not any(modality_plans is not None for modality_plans in plans.values()):
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        embeddings: tuple[Tensor, ...] = ()
        for modality, modality_input in inputs.items():
            if modality_input is None:
                continue
            modality_plans = plans.get(modality)
            if modality_plans is None:
                embeddings += tuple(self.stock_features(modality, modality_input))
            else:
                embeddings += tuple(self._pruned_items(modality, modality_input, modality_plans))
        return embeddings

    def _pruned_items(self, modality: str, modality_input: Any, plans: list[ItemPlan]) -> list[Tensor]:
        encoded = self.encode_items(modality, modality_input, with_attention=needs_attention(plans),
                                    with_layouts=explaining(plans))
        results = prune_items_with_positions(
            encoded.features, encoded.attention, plans, self.get_language_model().embed_input_ids,  # type: ignore[attr-defined]
            encoded.candidates, encoded.attention_seconds, encoded.layouts, encoded.segments,
        )
        if encoded.carried is not None:
            results = [(torch.cat([rows, encoded.carried[index][kept if kept is not None else slice(None)]], dim=1),
                        kept) for index, (rows, kept) in enumerate(results)]
        return [rows if kept is None else self.place_rows(modality, modality_input, index, rows, kept)
                for index, (rows, kept) in enumerate(results)]


#: Input type -> the key of its per-item batch in LLaVA-style parsed inputs.
ITEMS_KEY = {"pixel_values": "pixel_values", "image_embeds": "data", "pixel_values_videos": "pixel_values_videos"}


def cls_free(model: Any, attention: Tensor) -> Tensor:
    """``[views, S]`` tower attention -> ``[views, N]`` feature rows: LLaVA-style models drop the [CLS] row of
    a CLIP tower's features under ``vision_feature_select_strategy == "default"``, so its column goes too."""
    return attention[:, 1:] if model.config.vision_feature_select_strategy == "default" else attention
