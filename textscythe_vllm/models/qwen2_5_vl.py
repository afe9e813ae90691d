"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) with TextScythe pruning of images and videos.

Visual tokens: the vision tower's output after the patch merger -- one row per 2x2 block of 14 px patches
(``spatial_merge_size`` 2), per 2-frame temporal patch for videos; ``t * (h / 2) * (w / 2)`` rows in raster order
(time, row, column). The budget counts the rows of each image, and of each video over all its frames (the
selector chooses jointly over every frame's rows).

Attention (no [CLS] token): for each merged row, the mean attention its patches *receive* at the last
full-attention block of the tower (``max(fullatt_block_indexes)``)::

    a_p = 1/H * sum_h  1/L * sum_{i in S(p)}  softmax_j( q_i^h . k_j^h / sqrt(d) )_p      (patch p)
    A_m = mean of a_p over the 4 patches merged into row m

``S(p)`` is the full-attention sequence holding patch ``p`` -- one image, or one temporal patch of a video
(vLLM's and transformers' ``cu_seqlens``) -- and ``L = |S(p)|``; ``q`` and ``k`` are that block's queries and
keys *after* its 2-D rotary embedding. They are read off vLLM's own forward pass with a forward hook on the
block's rotary module (:class:`~textscythe_vllm.probes.RotaryAttentionProbe`); the column means are computed per sequence in query
chunks, so no ``L x L`` matrix is held whole and vLLM's attention backend is untouched.

Positions (M-RoPE): every kept row keeps its *original* ``(t, h, w)`` position, and text after an item keeps
the position it has in the unpruned prompt (so does the first generated token). How:

1. ``get_mrope_input_positions`` (called when the request enters the worker, before any encoder run) lays the
   prompt out as stock vLLM does, except that each pruned item's ``K`` placeholders all get the item's *base*
   position (the position of its first grid cell) and the text after it continues from ``base + span``, span
   being the unpruned item's extent. Unpruned items get stock positions.
2. ``embed_multimodal`` appends the kept rows' relative ``(t, h, w)`` to each pruned row, as 9 extra channels
   (three base-256 digits per value, exact in bf16/fp16/fp32).
3. ``embed_input_ids`` strips those channels and records, for the batch it embeds, which token carries which
   relative position; the ``forward`` that follows adds them to the placeholders' base positions.

Every position of a request therefore depends only on the prompt and on each row's own channels, never on how
the prompt was chunked, on which step a row arrives, or on vLLM's EVS helpers. Requests without a budget carry
no channels and take stock vLLM's code path unchanged (positions from the parent class).

Not combinable with vLLM's EVS (``--video-pruning-rate > 0``): then this class behaves exactly as stock vLLM
and budgets are refused. Pruned requests need the eager vision encoder (encoder CUDA graphs are turned off for
this model) and a single pipeline stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, explain
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    EmbeddingItems,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from textscythe_vllm.probes import RotaryAttentionProbe
from textscythe_vllm.processing import PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import EncodedItems, PruningModel
from textscythe_vllm.request import BUDGET_FIELD, PruningRequest, PruningRequestError

logger = logging.getLogger(LOGGER_NAME)

MODALITIES = ("image", "video")
#: Extra channels appended to each pruned row: (t, h, w), each as three base-256 digits (most significant
#: first). Digits 0..255 are exact in bf16, fp16 and fp32, so positions up to 2**24 - 1 survive any dtype.
POSITION_DIGITS = 3
POSITION_CHANNELS = 3 * POSITION_DIGITS
_DIGIT_BASE = 256


def grid_positions(t: int, h: int, w: int, t_factor: float) -> np.ndarray:
    """``[3, t*h*w]`` int64 M-RoPE offsets of an item's merged grid in raster order, exactly as stock vLLM's
    ``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions`` lays them out (before adding the base)."""
    grid = np.indices((t, h, w))
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid.reshape(3, -1)


def encode_positions(relative: Tensor, dtype: torch.dtype) -> Tensor:
    """``[3, K]`` non-negative ints -> ``[K, 9]`` digit channels in ``dtype``."""
    if int(relative.min()) < 0 or int(relative.max()) >= _DIGIT_BASE**POSITION_DIGITS:
        raise ValueError(f"M-RoPE offsets out of range: {int(relative.min())}..{int(relative.max())}")
    digits = []
    for power in reversed(range(POSITION_DIGITS)):
        digits.append(torch.div(relative, _DIGIT_BASE**power, rounding_mode="floor") % _DIGIT_BASE)
    # [digits, 3, K] -> [K, 3, digits] -> [K, 9]: channel 3*axis + digit
    return torch.stack(digits).permute(2, 1, 0).reshape(relative.shape[1], POSITION_CHANNELS).to(dtype)


def decode_positions(channels: Tensor) -> Tensor:
    """``[K, 9]`` digit channels -> ``[3, K]`` int64 offsets."""
    digits = channels.float().round().long().reshape(channels.shape[0], 3, POSITION_DIGITS)
    values = torch.zeros(channels.shape[0], 3, dtype=torch.long, device=channels.device)
    for digit in range(POSITION_DIGITS):
        values = values * _DIGIT_BASE + digits[:, :, digit]
    return values.T


def split_position_channels(
    embeddings: Sequence[Tensor], width: int, is_multimodal: Tensor | None
) -> tuple[list[Tensor], tuple[Tensor, Tensor] | None]:
    """Strip the position channels of pruned rows: ``(rows of width `width`, pending)``.

    ``pending`` is ``None`` when no row carries channels, else ``(token_index [R], offsets [3, R])``: for each
    pruned row, the index of its token in the batch (the ``is_multimodal`` positions receive the rows in order)
    and its ``(t, h, w)`` offset.
    """
    if all(embedding.shape[-1] == width for embedding in embeddings):
        return list(embeddings), None
    cleaned, tagged_rows, offsets, row = [], [], [], 0
    for embedding in embeddings:
        count = embedding.shape[0]
        if embedding.shape[-1] == width + POSITION_CHANNELS:
            cleaned.append(embedding[:, :width])
            tagged_rows.append(torch.arange(row, row + count))
            offsets.append(decode_positions(embedding[:, width:]))
        elif embedding.shape[-1] == width:
            cleaned.append(embedding)
        else:
            raise RuntimeError(f"textscythe: multimodal rows of width {embedding.shape[-1]}, expected {width}")
        row += count
    if is_multimodal is None:
        raise RuntimeError("textscythe: pruned multimodal rows without an is_multimodal mask")
    token_index = is_multimodal.nonzero(as_tuple=True)[0].cpu()
    if token_index.numel() != row:
        raise RuntimeError(f"textscythe: {row} multimodal rows for {token_index.numel()} placeholders")
    return cleaned, (token_index[torch.cat(tagged_rows)], torch.cat(offsets, dim=1))


def vision_attention_probe(visual: torch.nn.Module) -> RotaryAttentionProbe:
    """The probe on the last full-attention block's rotary module (its ``cu_seqlens`` segments are whole images
    or whole temporal patches of a video)."""
    attention = visual.blocks[max(visual.fullatt_block_indexes)].attn
    return RotaryAttentionProbe(attention.apply_rotary_emb, local_heads=attention.num_attention_heads_per_partition,
                                head_dim=attention.hidden_size_per_attention_head, tp_size=attention.tp_size)


def merged_row_attention(visual: torch.nn.Module, patches: Tensor, grid_thw: Sequence[Sequence[int]]) -> list[Tensor]:
    """Per item ``[t * h/m * w/m]``: the per-patch values averaged over each merged row's ``m*m`` patches, taken
    from the tower's window order back to raster order."""
    merged = patches.reshape(-1, visual.spatial_merge_unit).mean(dim=1)  # window order, one value per merged row
    items, offset = [], 0
    for t, h, w in grid_thw:
        window_index, _ = visual.get_window_index_thw(int(t), int(h), int(w))
        count = window_index.numel()
        raster = torch.empty(count, dtype=merged.dtype, device=merged.device)
        raster[window_index.to(merged.device)] = merged[offset:offset + count]
        items.append(raster)
        offset += count
    return items


class TextScytheQwen2_5_VLMultiModalProcessor(PruningProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pruned_modalities = MODALITIES

    def placeholder_token_ids(self, modality: str = "image") -> list[int]:
        config = self.info.get_hf_config()
        return [config.image_token_id if modality == "image" else config.video_token_id]

    def _check_request(self, request: PruningRequest | None) -> None:
        if request is not None and self.info.ctx.get_mm_config().is_multimodal_pruning_enabled():
            raise PruningRequestError(
                BUDGET_FIELD,
                f"'{BUDGET_FIELD}' cannot be used on a server running vLLM's own video pruning (EVS, "
                "--video-pruning-rate > 0)",
            )

    def _num_processed_items(self, processed_data: Any, modality: str = "image") -> int:
        grid = processed_data.get(f"{modality}_grid_thw")
        return 0 if grid is None else len(grid)

    def _unpruned_token_count(self, items: Any, index: int, modality: str = "image") -> int:
        if isinstance(items, EmbeddingItems):
            return items.get_feature_size(index)
        image_processor = self.info.get_image_processor()
        if modality == "image":
            size = items.get_image_size(index)
            return self.info.get_num_image_tokens(
                image_width=size.width, image_height=size.height, image_processor=image_processor, mm_kwargs={}
            )
        video = items.get(index)
        frames = video[0] if isinstance(video, tuple) else video  # (frames, metadata) when metadata is needed
        first = frames[0]
        width, height = first.size if hasattr(first, "size") and not hasattr(first, "shape") else (
            first.shape[-2], first.shape[-3]  # HWC frames
        )
        return self.info.get_num_video_tokens(
            image_width=int(width), image_height=int(height), num_frames=len(frames),
            image_processor=image_processor, mm_kwargs={},
        )


@MULTIMODAL_REGISTRY.register_processor(
    TextScytheQwen2_5_VLMultiModalProcessor,
    info=with_plugin_context(Qwen2_5_VLProcessingInfo),
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TextScytheQwen2_5_VLForConditionalGeneration(PruningModel, Qwen2_5_VLForConditionalGeneration):
    pruned_modalities = MODALITIES

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM's EVS owns positions when it is on; this class then stays stock (the processor refuses budgets).
        self._evs = bool(self.is_multimodal_pruning_enabled)
        self._embeds_width = vllm_config.model_config.get_inputs_embeds_size()
        self.attention_probe = None if self.use_data_parallel else vision_attention_probe(self.visual)
        self._pending_positions: tuple[Tensor, Tensor] | None = None
        if vllm_config.parallel_config.pipeline_parallel_size > 1 and not self._evs:
            logger.warning("textscythe: Qwen2.5-VL requests with a visual_token_budget need a single pipeline "
                           "stage; later stages would place the kept visual tokens at their item's first position")

    # -- encoder ------------------------------------------------------------------------------------------

    def pruning_enabled(self) -> bool:
        return not self._evs

    def count_items(self, modality: str, modality_input: Any) -> int:
        return int(modality_input[f"{modality}_grid_thw"].shape[0])

    def encode_items(self, modality: str, modality_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        grid_thw = [[int(v) for v in row] for row in modality_input[f"{modality}_grid_thw"].tolist()]
        probe = self.attention_probe if modality_input["type"].startswith("pixel_values") and with_attention else None
        attention: list[Tensor | None] = [None] * len(grid_thw)
        seconds = 0.0
        if probe is None:
            features = self.stock_features(modality, modality_input)
        else:
            with probe.capture_segments([h * w for t, h, w in grid_thw for _ in range(t)]) as captured:
                features = self.stock_features(modality, modality_input)
            if captured:
                attention, seconds = list(merged_row_attention(self.visual, captured[-1], grid_thw)), probe.seconds
            else:
                logger.warning("textscythe: the vision attention probe saw no forward pass; selecting without it")
        merge = self.visual.spatial_merge_size
        layouts = ([explain.patch_grid(h // merge, w // merge, t, region="whole") for t, h, w in grid_thw]
                   if with_layouts else None)
        return EncodedItems(features, attention, None, layouts, seconds)

    def place_rows(self, modality: str, modality_input: Any, index: int, rows: Tensor, kept: Tensor) -> Tensor:
        t, h, w = (int(v) for v in modality_input[f"{modality}_grid_thw"][index].tolist())
        merge = self.visual.spatial_merge_size
        relative = grid_positions(t, h // merge, w // merge, self._t_factor(modality, modality_input, index))
        relative = torch.from_numpy(relative).to(kept.device)[:, kept]  # [3, K]
        return torch.cat([rows, encode_positions(relative, rows.dtype)], dim=1)

    def _t_factor(self, modality: str, modality_input: Any, index: int) -> float:
        """Temporal position step of item ``index``, as stock vLLM's ``iter_mm_grid_thw`` computes it."""
        if modality == "image":
            return 1.0
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = modality_input.get("second_per_grid_ts")
        second_per_grid = 1.0 if seconds is None else float(seconds[index].item())
        return second_per_grid * tokens_per_second

    def get_encoder_cudagraph_config(self) -> Any:
        # Captured encoder graphs bypass embed_multimodal (no pruning: more rows than placeholders).
        config = super().get_encoder_cudagraph_config()
        return config if self._evs else replace(config, modalities=[])

    # -- positions ----------------------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        features = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        grids = list(self.iter_mm_grid_thw(features))  # (offset, t, h, w, t_factor), same order
        lengths = [feature.mm_position.length for feature in features]
        if self._evs or all(length == t * h * w for (_, t, h, w, _), length in zip(grids, lengths, strict=True)):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        blocks = []
        consumed = 0  # prompt tokens laid out so far
        next_position = 0  # position of the next token in the *unpruned* layout
        for (offset, t, h, w, t_factor), length in zip(grids, lengths, strict=True):
            text = offset - consumed
            blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            base = next_position + text
            grid = grid_positions(t, h, w, t_factor)
            if length == t * h * w:
                blocks.append(grid + base)
            else:  # pruned: base everywhere; forward() adds each kept row's own offset
                blocks.append(np.full((3, length), base, dtype=np.int64))
            next_position = base + int(grid.max()) + 1
            consumed = offset + length
        text = len(input_tokens) - consumed
        blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(blocks, axis=1).astype(np.int64)
        return torch.from_numpy(positions), next_position + text - len(input_tokens)

    def embed_input_ids(
        self, input_ids: Tensor, multimodal_embeddings: Any = None, *, is_multimodal: Tensor | None = None
    ) -> Tensor:
        self._pending_positions = None
        if not self._evs and multimodal_embeddings is not None and len(multimodal_embeddings):
            multimodal_embeddings, self._pending_positions = split_position_channels(
                multimodal_embeddings, self._embeds_width, is_multimodal
            )
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: object,
    ) -> Any:
        pending, self._pending_positions = self._pending_positions, None
        if pending is not None:
            positions = self._apply_offsets(positions, *pending)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _apply_offsets(self, positions: Tensor, token_index: Tensor, offsets: Tensor) -> Tensor:
        """``positions`` with each pruned row's ``(t, h, w)`` offset added to its placeholder's base position."""
        index = token_index.to(positions.device)
        if positions.ndim != 2 or positions.shape[0] != 3 or (index.numel() and int(index.max()) >= positions.shape[1]):
            return self._skip_offsets(positions, f"positions of shape {tuple(positions.shape)}")
        base = positions[:, index]
        if not bool((base == base[:1]).all()):  # placeholders of pruned rows carry their item's base, 3x
            return self._skip_offsets(positions, "placeholder positions that are not an item base")
        fixed = positions.clone()
        fixed[:, index] = base + offsets.to(device=positions.device, dtype=positions.dtype)
        return fixed

    @staticmethod
    def _skip_offsets(positions: Tensor, why: str) -> Tensor:
        # Structural: the runner did not hand over what get_mrope_input_positions laid out. Keep serving (the
        # rows then share their item's base position) but say so loudly.
        logger.error("textscythe: pruned visual rows keep their item's base position: got %s", why)
        return positions
