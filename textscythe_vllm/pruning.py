"""Model-side glue: choose each image's rows inside ``embed_multimodal``.

The invariant this module protects: ``embed_multimodal`` returns exactly as many rows per image as the
processor gave it placeholders -- ``min(budget, N)``. vLLM kills the engine on fewer rows and silently
truncates more, so every failure in selection falls back to a deterministic choice of the right size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, _vllm, explain, metrics
from textscythe_vllm.processing import ImagePlan, plan_field
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


def needs_attention(plans: Sequence[ImagePlan]) -> bool:
    """Whether any plan's selector reads the tower's attention: if none does, the probe is not run."""
    return any(plan.budget and selector_instance(plan.selector).uses_attention for plan in plans)


def decode_plans(packed: object, num_items: int) -> list[ImagePlan] | None:
    """Plans from the :data:`~textscythe_vllm.processing.PLAN_FIELD` batch (a stacked tensor or a list)."""
    if packed is None:
        return None
    rows = list(packed.unbind(0)) if isinstance(packed, Tensor) else list(packed)  # type: ignore[call-overload]
    if len(rows) != num_items:
        raise RuntimeError(f"textscythe: {len(rows)} pruning plans for {num_items} items")
    plans = [ImagePlan.decode(row) for row in rows]
    return plans if any(plan.budget for plan in plans) else None


def choose_rows(
    features: Tensor,  # [M, D] one item's projected visual tokens, in placeholder order
    attention: Tensor | None,  # [M] attention each row receives in the vision tower, or None
    text: Tensor,  # [T, D] instruction-token embeddings
    plan: ImagePlan,
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
    plan: ImagePlan,
    candidates: Tensor | None = None,
    extra_seconds: float = 0.0,
    layout: dict[str, Any] | None = None,  # how the rows lie on the item (explanations); default: square grid
) -> tuple[Tensor, Tensor]:
    """``(rows [min(budget, M), D], positions [min(budget, M)])``: the rows to feed the LLM, in position order,
    and the ascending row index in ``features`` each one stands at (a merged row stands at its selector's
    index); never raises, never another count.

    Pruning selectors return kept rows; merging selectors (visionzip, visiondrop) return merged rows. Layout
    rows (LLaVA-NeXT's newline tokens) are not selected while image rows remain; when the budget exceeds the
    image rows, the earliest layout rows fill the rest so the count still matches the placeholders.
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
        positions, rows, info = _select(features, attention, text, plan.selector, keep, candidates)
        if rows.shape != (keep, features.shape[1]):
            raise RuntimeError(f"selector {plan.selector!r} returned {tuple(rows.shape)}, expected {keep} rows")
        fallback = None
    except Exception:
        logger.exception("textscythe: selector %r failed; falling back to %r", plan.selector, FALLBACK_SELECTOR)
        metrics.record_fallback(plan.selector)
        info, fallback = {}, FALLBACK_SELECTOR
        try:
            positions, rows, _ = _select(
                features, None, text[:0], FALLBACK_SELECTOR, keep, candidates if layout_matches else None
            )
        except Exception:
            logger.exception("textscythe: fallback selector failed; keeping the first %d rows", keep)
            positions, rows, fallback = torch.arange(keep, device=features.device), features[:keep], "first_rows"
    seconds = time.perf_counter() - started + extra_seconds
    metrics.record_selection(plan.selector, seconds)
    _log_selection(plan, num_rows, positions)
    if plan.explain_id:
        _explain_selection(plan, features, text, positions, info, fallback, seconds, layout)
    return rows, positions


def _explain_selection(plan: ImagePlan, features: Tensor, text: Tensor, positions: Tensor, info: dict[str, Tensor],
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


def _log_selection(plan: ImagePlan, num_rows: int, positions: Tensor) -> None:
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
    plans: Sequence[ImagePlan],
    embed_tokens: Callable[[Tensor], Tensor],  # instruction ids [T] -> embeddings [T, D]
    candidates: Sequence[Tensor | None] | None = None,
    attention_seconds: float = 0.0,  # time spent computing ``attention`` for the whole batch
    layouts: Sequence[dict[str, Any] | None] | None = None,  # per item, for explanations
) -> list[Tensor]:
    """Apply each item's plan; unpruned items (budget 0 or >= their token count) come back unchanged."""
    return [rows for rows, _ in prune_items_with_positions(
        features, attention, plans, embed_tokens, candidates, attention_seconds, layouts
    )]


def explaining(plans: Sequence[ImagePlan]) -> bool:
    """Whether any item of the batch is explained (family modules then describe their items' layouts)."""
    return any(plan.explain_id for plan in plans)


def prune_items_with_positions(
    features: Sequence[Tensor],
    attention: Sequence[Tensor | None],
    plans: Sequence[ImagePlan],
    embed_tokens: Callable[[Tensor], Tensor],
    candidates: Sequence[Tensor | None] | None = None,
    attention_seconds: float = 0.0,
    layouts: Sequence[dict[str, Any] | None] | None = None,  # per item, for explanations
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
            None if layouts is None else layouts[index],
        ))
    return pruned


class ModalityPruningMixin:
    """``embed_multimodal`` for a model that prunes several modalities (put in front of vLLM's model class).

    Pops each modality's plan field, parses the inputs with the model's own parsing
    (:func:`textscythe_vllm._vllm.parse_multimodal_inputs`, whose order -- the kwargs order -- is the order vLLM
    expects the items in), and hands each modality with plans to ``_embed_items``; a batch without any budget takes
    the parent class's path unchanged. Subclasses define ``_num_items`` and ``_embed_items``.
    """

    pruned_modalities: tuple[str, ...] = ("image",)

    def _pruning_enabled(self) -> bool:
        return True

    def _num_items(self, modality: str, modality_input: Any) -> int:
        raise NotImplementedError

    def _embed_items(self, modality: str, modality_input: Any, plans: list[ImagePlan] | None) -> list[Tensor]:
        raise NotImplementedError

    def embed_multimodal(self, **kwargs: object) -> Any:
        packed = {modality: kwargs.pop(plan_field(modality), None) for modality in self.pruned_modalities}
        if not self._pruning_enabled():
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        inputs = _vllm.parse_multimodal_inputs(self, **kwargs)
        plans = {
            modality: decode_plans(packed.get(modality), self._num_items(modality, modality_input))
            for modality, modality_input in inputs.items()
            if modality_input is not None
        }
        if not any(modality_plans is not None for modality_plans in plans.values()):
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        embeddings: tuple[Tensor, ...] = ()
        for modality, modality_input in inputs.items():
            if modality_input is not None:
                embeddings += tuple(self._embed_items(modality, modality_input, plans.get(modality)))
        return embeddings


#: Elements of one ``[heads, queries, keys]`` score block when attention is averaged over all queries (fp32:
#: 64 MiB): the full ``S x S`` matrix is never held.
PROBE_BLOCK_ELEMENTS = 1 << 24


def sum_over_ranks(head_sums: Tensor, tp_size: int) -> Tensor:
    """Per-rank sums over the rank's attention heads -> the sum over all heads, the same on every rank (tensor
    parallelism splits the heads; every probe divides by the total head count afterwards)."""
    return _vllm.tensor_model_parallel_all_reduce(head_sums) if tp_size > 1 else head_sums


def mean_received_attention(
    query: Tensor,  # [L, h, d] one sequence's queries (this rank's heads)
    key: Tensor,  # [L, h, d] its keys
    scale: float,
) -> Tensor:
    """``[L]``: for each token ``j``, ``sum_h 1/L sum_i softmax_j(q_i^h . k^h / sqrt(d))_j`` -- the attention it
    receives, averaged over the sequence's queries and *summed* over the given heads (callers divide by the
    total head count, after an all-reduce under tensor parallelism). Scores are computed in query chunks of at
    most :data:`PROBE_BLOCK_ELEMENTS`, in float32."""
    length, heads = query.shape[0], query.shape[1]
    keys = key.float().permute(1, 2, 0)  # [h, d, L]
    total = torch.zeros(length, dtype=torch.float32, device=query.device)
    chunk = max(1, PROBE_BLOCK_ELEMENTS // (heads * length))
    for first in range(0, length, chunk):
        queries = query[first:first + chunk].float().transpose(0, 1)  # [h, c, d]
        scores = torch.bmm(queries, keys) * scale  # [h, c, L]
        total += torch.softmax(scores, dim=-1).sum(dim=(0, 1))
    return total / length


class ClsAttentionProbe:
    """[CLS] attention of a CLIP tower's feature layer, read off vLLM's own forward pass.

    A forward hook on the last encoder layer's ``qkv_proj`` (the layer whose output LLaVA uses as features:
    vLLM builds the tower only up to the feature layer) takes the query row of the [CLS] token and the keys
    of all tokens, and computes ``softmax(q_cls . K^T / sqrt(d))`` per head, averaged over heads: ``[B, S]``,
    O(S * d) per head, never an ``S x S`` matrix, and the attention backend is untouched. With tensor
    parallelism each rank holds some heads; their sums are all-reduced so every rank sees the same scores.
    """

    def __init__(self, attention_module: torch.nn.Module) -> None:
        self._attention = attention_module
        self._captured: list[Tensor] | None = None
        self.seconds = 0.0  # time spent in the probe during the last capture
        attention_module.qkv_proj.register_forward_hook(self._on_qkv)

    @classmethod
    def for_clip_tower(cls, vision_tower: torch.nn.Module) -> ClsAttentionProbe | None:
        if not isinstance(vision_tower, _vllm.CLIPVisionModel):
            return None
        return cls(vision_tower.vision_model.encoder.layers[-1].self_attn)

    def _on_qkv(self, module: torch.nn.Module, args: object, output: object) -> None:
        if self._captured is None:
            return
        started = time.perf_counter()
        qkv = output[0] if isinstance(output, tuple) else output  # [B, S, 3 * local_dim]
        self._captured.append(self.scores(qkv))
        self.seconds += time.perf_counter() - started

    def scores(self, qkv: Tensor) -> Tensor:
        attention = self._attention
        heads, head_dim = attention.num_heads_per_partition, attention.head_dim
        batch, seq_len = qkv.shape[0], qkv.shape[1]
        query, key, _ = qkv.float().chunk(3, dim=-1)
        cls_query = query[:, 0].reshape(batch, heads, head_dim)  # [B, h, d]
        keys = key.reshape(batch, seq_len, heads, head_dim)  # [B, S, h, d]
        scores = torch.einsum("bhd,bshd->bhs", cls_query, keys) * attention.scale
        summed = torch.softmax(scores, dim=-1).sum(dim=1)  # [B, S], summed over this rank's heads
        return sum_over_ranks(summed, attention.tp_size) / attention.num_heads

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """Collect ``[B, S]`` attention for every tower call inside the block."""
        self._captured = captured = []
        self.seconds = 0.0
        try:
            yield captured
        finally:
            self._captured = None


class MeanAttentionProbe(ClsAttentionProbe):
    """Mean attention each token *receives* at a tower's feature layer, for towers without a [CLS] token
    (SigLIP): ``A_j = 1/H sum_h 1/S sum_i softmax_j(q_i^h . k^h / sqrt(d))_j`` over the ``S`` tokens of one view,
    ``[B, S]``. Read off the same ``qkv_proj`` hook as :class:`ClsAttentionProbe` (the backend is untouched),
    computed per view in query chunks (:func:`mean_received_attention`), never as a whole ``S x S`` matrix."""

    @classmethod
    def for_siglip_tower(cls, vision_tower: torch.nn.Module) -> MeanAttentionProbe | None:
        if not isinstance(vision_tower, _vllm.SiglipVisionModel):
            return None
        return cls(vision_tower.vision_model.encoder.layers[-1].self_attn)

    def scores(self, qkv: Tensor) -> Tensor:
        attention = self._attention
        heads, head_dim = attention.num_heads_per_partition, attention.head_dim
        batch, seq_len = qkv.shape[0], qkv.shape[1]
        query, key, _ = qkv.chunk(3, dim=-1)
        summed = torch.stack([
            mean_received_attention(
                query[view].reshape(seq_len, heads, head_dim), key[view].reshape(seq_len, heads, head_dim),
                attention.scale,
            )
            for view in range(batch)
        ])  # [B, S], summed over this rank's heads
        return sum_over_ranks(summed, attention.tp_size) / attention.num_heads


def tower_attention_probe(vision_tower: torch.nn.Module) -> ClsAttentionProbe | None:
    """The attention probe of a LLaVA-family tower: [CLS] attention for CLIP, mean received attention for
    SigLIP; ``None`` for any other tower (selection then runs without attention)."""
    return ClsAttentionProbe.for_clip_tower(vision_tower) or MeanAttentionProbe.for_siglip_tower(vision_tower)
