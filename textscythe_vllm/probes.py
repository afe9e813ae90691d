"""Attention probes: the attention each visual token receives in a vision tower, read off vLLM's own forward pass.

Every probe is a forward hook on a module of the tower's last (feature) attention layer that already holds the
queries and keys vLLM computed -- the fused ``qkv_proj`` output of CLIP/SigLIP, the rotated ``[q; k]`` of the Qwen
towers -- so the attention backend is never touched and nothing is recomputed but the scores. Scores are formed
in float32, per sequence and in query chunks of at most :data:`PROBE_BLOCK_ELEMENTS`; no ``S x S`` matrix is held.

One head reduction for all of them (:func:`mean_over_heads`): each rank sums over the heads it holds, the sums
are all-reduced under tensor parallelism, and the total is divided by the model's head count, so every rank
returns the same scores.

Definitions (``h`` heads, ``d`` head width, sequence of ``S`` tokens):

* [CLS] attention (CLIP): ``A_j = 1/H sum_h softmax_j(q_cls^h . k^h / sqrt(d))``;
* mean received attention (towers without [CLS]): ``A_j = 1/H sum_h 1/S sum_i softmax_j(q_i^h . k^h / sqrt(d))``.

Family modules lay these per-patch scores out like their features (any-resolution merge, pooling, pixel shuffle,
patch merger); see ``textscythe_vllm/models``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, _vllm

logger = logging.getLogger(LOGGER_NAME)

#: Elements of one ``[heads, queries, keys]`` score block when attention is averaged over all queries (fp32:
#: 16 MiB): a block that stays in cache between the matmul, the softmax and the column sum runs several times faster
#: on a CPU than one four times larger (docs/benchmarks.md, the Qwen3-VL-8B shape).
PROBE_BLOCK_ELEMENTS = 1 << 22


def mean_over_heads(head_sums: Tensor, total_heads: int, tp_size: int) -> Tensor:
    """This rank's sums over its heads -> the mean over all ``total_heads`` heads, the same on every rank."""
    if tp_size > 1:
        head_sums = _vllm.tensor_model_parallel_all_reduce(head_sums)
    return head_sums / total_heads


def mean_received_attention(
    query: Tensor,  # [L, h, d] one sequence's queries (this rank's heads)
    key: Tensor,  # [L, h, d] its keys
    scale: float,
) -> Tensor:
    """``[L]``: for each token ``j``, ``sum_h 1/L sum_i softmax_j(q_i^h . k^h * scale)_j`` -- the attention it
    receives, averaged over the sequence's queries and *summed* over the given heads (then
    :func:`mean_over_heads`)."""
    length, heads = query.shape[0], query.shape[1]
    keys = key.float().permute(1, 2, 0)  # [h, d, L]
    total = torch.zeros(length, dtype=torch.float32, device=query.device)
    chunk = max(1, PROBE_BLOCK_ELEMENTS // (heads * length))
    for first in range(0, length, chunk):
        queries = query[first:first + chunk].float().transpose(0, 1)  # [h, c, d]
        scores = torch.bmm(queries, keys) * scale  # [h, c, L]
        total += torch.softmax(scores, dim=-1).sum(dim=(0, 1))
    return total / length


class AttentionProbe:
    """A forward hook that turns one module's output into scores while :meth:`capture` is open.

    Subclasses implement :meth:`scores` (module output -> scores). ``seconds`` is the time spent scoring during
    the last capture (reported as part of the selection time).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self._captured: list[Tensor] | None = None
        self.seconds = 0.0
        module.register_forward_hook(self._on_output)

    def _on_output(self, module: torch.nn.Module, args: object, output: object) -> None:
        if self._captured is None:
            return
        started = time.perf_counter()
        scores = self.scores(output[0] if isinstance(output, tuple) else output)
        if scores is not None:
            self._captured.append(scores)
        self.seconds += time.perf_counter() - started

    def scores(self, output: Tensor) -> Tensor | None:
        raise NotImplementedError

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """Collect the scores of every forward pass of the hooked module inside the block."""
        self._captured = captured = []
        self.seconds = 0.0
        try:
            yield captured
        finally:
            self._captured = None


class ClsAttentionProbe(AttentionProbe):
    """[CLS] attention of a CLIP tower's feature layer, ``[B, S]``: a hook on that layer's ``qkv_proj`` (vLLM
    builds the tower only up to the feature layer, so it is the last one) takes the [CLS] query row and all
    keys -- O(S * d) per head."""

    def __init__(self, attention: torch.nn.Module) -> None:
        self._attention = attention
        super().__init__(attention.qkv_proj)

    @classmethod
    def for_clip_tower(cls, vision_tower: torch.nn.Module) -> ClsAttentionProbe | None:
        if not isinstance(vision_tower, _vllm.CLIPVisionModel):
            return None
        return cls(vision_tower.vision_model.encoder.layers[-1].self_attn)

    def scores(self, qkv: Tensor) -> Tensor:  # qkv: [B, S, 3 * local_dim]
        attention = self._attention
        heads, head_dim = attention.num_heads_per_partition, attention.head_dim
        batch, seq_len = qkv.shape[0], qkv.shape[1]
        query, key, _ = qkv.float().chunk(3, dim=-1)
        cls_query = query[:, 0].reshape(batch, heads, head_dim)  # [B, h, d]
        keys = key.reshape(batch, seq_len, heads, head_dim)  # [B, S, h, d]
        scores = torch.einsum("bhd,bshd->bhs", cls_query, keys) * attention.scale
        summed = torch.softmax(scores, dim=-1).sum(dim=1)  # [B, S], summed over this rank's heads
        return mean_over_heads(summed, attention.num_heads, attention.tp_size)


class MeanAttentionProbe(ClsAttentionProbe):
    """Mean attention each token *receives* at a SigLIP tower's feature layer (no [CLS]), ``[B, S]`` per view,
    from the same ``qkv_proj`` hook."""

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
        ])  # [B, S]
        return mean_over_heads(summed, attention.num_heads, attention.tp_size)


def tower_attention_probe(vision_tower: torch.nn.Module) -> ClsAttentionProbe | None:
    """The probe of a LLaVA-family tower: [CLS] attention for CLIP, mean received attention for SigLIP; ``None``
    for any other tower (selection then runs without attention)."""
    return ClsAttentionProbe.for_clip_tower(vision_tower) or MeanAttentionProbe.for_siglip_tower(vision_tower)


class RotaryAttentionProbe(AttentionProbe):
    """Mean attention received per patch at one block of a Qwen-style tower, whose patches of *all* items of a
    batch form one packed sequence split by ``cu_seqlens`` into full-attention segments (one image, or one
    temporal patch of a video).

    The hook sits on the block's rotary module, whose output is the rotated ``[q; k]`` (``[2, S, heads, d]``);
    :meth:`capture` is told the segment lengths. Scores: ``[S]`` in the tower's patch order.
    """

    def __init__(self, rotary: torch.nn.Module, *, local_heads: int, head_dim: int, tp_size: int) -> None:
        self.local_heads, self.head_dim, self.tp_size = local_heads, head_dim, tp_size
        self.scale = head_dim**-0.5
        self._segments: list[int] = []
        super().__init__(rotary)

    @classmethod
    def for_vision_attention(cls, attention: torch.nn.Module) -> RotaryAttentionProbe:
        """The probe of one ``Qwen2_5_VisionAttention`` block (the Qwen2.5-VL and Qwen3-VL towers)."""
        return cls(attention.apply_rotary_emb, local_heads=attention.num_attention_heads_per_partition,
                   head_dim=attention.hidden_size_per_attention_head, tp_size=attention.tp_size)

    @contextlib.contextmanager
    def capture_segments(self, segments: Sequence[int]) -> Iterator[list[Tensor]]:
        self._segments = [int(length) for length in segments]
        with self.capture() as captured:
            yield captured

    def scores(self, rotated: Tensor) -> Tensor | None:
        if rotated.shape[0] != 2 or rotated.shape[1] != sum(self._segments):
            logger.warning("textscythe: unexpected rotary output %s for segments summing to %d; no attention",
                           tuple(rotated.shape), sum(self._segments))
            return None
        query, key = rotated[0].float(), rotated[1].float()
        received = torch.empty(query.shape[0], dtype=torch.float32, device=query.device)
        start = 0
        for length in self._segments:
            received[start:start + length] = mean_received_attention(
                query[start:start + length], key[start:start + length], self.scale
            )
            start += length
        return mean_over_heads(received, self.local_heads * self.tp_size, self.tp_size)


class InternClsAttentionProbe(AttentionProbe):
    """[CLS] attention of an InternViT layer, ``[B, S]`` per tile: a hook on the layer's ``MMEncoderAttention``,
    whose *inputs* are the queries and keys vLLM computed -- after the optional QK RMSNorm (InternViT-6B), which a
    hook on the projections would miss -- as ``[B, S, local_heads * d]`` (the chat format's fused ``qkv`` and the
    HF format's ``q_proj`` / ``k_proj`` alike). Padding heads that make the head count divisible by the tensor
    parallel size (``num_dummy_heads``, zero weights) are left out of the head mean."""

    def __init__(self, attention: torch.nn.Module, *, local_heads: int, head_dim: int, total_heads: int,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        self.head_dim, self.total_heads, self.tp_size = head_dim, total_heads, tp_size
        self.scale = head_dim**-0.5
        # this rank's heads that are real (global index below the model's head count); dummy heads come last
        first = tp_rank * local_heads
        self.real_heads = max(0, min(local_heads, total_heads - first))
        super().__init__(attention)

    def _on_output(self, module: torch.nn.Module, args: object, output: object) -> None:
        # score the module's inputs (q, k), handed to the base class as the first entry of a tuple
        super()._on_output(module, args, (args[:2],))  # type: ignore[index]

    def scores(self, query_key: tuple[Tensor, Tensor]) -> Tensor:  # type: ignore[override]
        query, key = query_key  # [B, S, local_heads * d] each
        batch, seq_len = query.shape[0], query.shape[1]
        heads = self.real_heads
        cls_query = query[:, 0].float().reshape(batch, -1, self.head_dim)[:, :heads]  # [B, h, d]
        keys = key.float().reshape(batch, seq_len, -1, self.head_dim)[:, :, :heads]  # [B, S, h, d]
        scores = torch.einsum("bhd,bshd->bhs", cls_query, keys) * self.scale
        summed = torch.softmax(scores, dim=-1).sum(dim=1)  # [B, S], summed over this rank's real heads
        return mean_over_heads(summed, self.total_heads, self.tp_size)


class NormedRotaryAttentionProbe(AttentionProbe):
    """Mean attention each patch *receives* at a transformers vision attention module whose queries and keys are
    RMS-normalised per head (``q_norm`` / ``k_norm`` sub-modules) and then rotated by a multi-dimensional RoPE that
    the module is handed as ``position_embeddings=(cos, sin)`` with ``position_ids`` (Gemma 4's vision tower).
    Scores: ``[B, S]`` per batch row; padding patches (position ``(-1, -1)``) neither send nor receive attention
    and score 0.

    Three hooks, nothing recomputed but the rotation and the scores: a keyword pre-hook on the module keeps the
    rotary tables and positions of the call, one on ``q_norm`` keeps the normalised queries, and the ``k_norm``
    output -- the last of the three -- triggers the scoring. ``rotate(x, cos, sin, position_ids)`` is the model's
    own RoPE function. :attr:`positions` holds each scored batch's ``[B, S, 2]`` positions, so callers can tell
    which item each row is (encoders may batch items in another order).
    """

    def __init__(self, attention: torch.nn.Module, rotate: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], *,
                 num_heads: int, num_key_value_heads: int, scale: float) -> None:
        self._rotate = rotate
        self.num_heads, self.num_key_value_heads, self.scale = num_heads, num_key_value_heads, scale
        self._call: dict[str, object] = {}
        self._query: Tensor | None = None
        self.positions: list[Tensor] = []
        attention.register_forward_pre_hook(self._on_call, with_kwargs=True)
        attention.q_norm.register_forward_hook(self._on_query)
        super().__init__(attention.k_norm)

    def _on_call(self, module: torch.nn.Module, args: object, kwargs: dict[str, object]) -> None:
        if self._captured is not None:
            self._call = kwargs

    def _on_query(self, module: torch.nn.Module, args: object, output: Tensor) -> None:
        if self._captured is not None:
            self._query = output

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        self.positions = []
        try:
            with super().capture() as captured:
                yield captured
        finally:
            self._call, self._query = {}, None  # drop the last call's activations

    def scores(self, key: Tensor) -> Tensor | None:  # key: [B, S, h_kv, d] after k_norm
        cos, sin = self._call.get("position_embeddings") or (None, None)  # type: ignore[misc]
        position_ids = self._call.get("position_ids")
        query = self._query
        if cos is None or not isinstance(position_ids, Tensor) or query is None or query.shape[:2] != key.shape[:2]:
            logger.warning("textscythe: the vision attention probe missed the rotary tables or queries; no attention")
            return None
        query = self._rotate(query, cos, sin, position_ids)  # [B, S, h, d]
        key = self._rotate(key, cos, sin, position_ids).repeat_interleave(
            self.num_heads // self.num_key_value_heads, dim=2)  # [B, S, h, d]: query head i reads kv head i // groups
        valid = ~(position_ids == -1).all(dim=-1)  # [B, S]
        summed = torch.zeros(key.shape[:2], dtype=torch.float32, device=key.device)
        for row in range(key.shape[0]):
            patches = valid[row].nonzero().squeeze(1)
            summed[row, patches] = mean_received_attention(query[row, patches], key[row, patches], self.scale)
        self.positions.append(position_ids)
        return mean_over_heads(summed, self.num_heads, 1)  # the tower is replicated: every rank holds all heads
