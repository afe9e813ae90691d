"""M-RoPE families (Qwen2.5-VL, Qwen3-VL, Qwen3.5): kept rows keep their original ``(t, h, w)`` positions.

How, for every such family (the family supplies only its grid layout, :meth:`MRopeRows.relative_positions` and
its own ``get_mrope_input_positions``):

1. ``get_mrope_input_positions`` (called when the request enters the worker, before any encoder run) lays the
   prompt out as stock vLLM does, except that each pruned item's placeholders all get their run's *base* position
   and the text after it continues from where the unpruned item would have ended.
2. ``embed_multimodal`` (``place_rows``) appends the kept rows' relative ``(t, h, w)`` to each pruned row, as
   :data:`POSITION_CHANNELS` extra channels (three base-256 digits per value, exact in bf16/fp16/fp32).
3. ``embed_input_ids`` strips those channels and records, for the batch it embeds, which token carries which
   relative position; the ``forward`` that follows adds them to the placeholders' base positions.

Every position of a request therefore depends only on the prompt and on each row's own channels, never on how
the prompt was chunked or on which step a row arrives. Requests without a budget carry no channels and take
stock vLLM's code path unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, _vllm
from textscythe_vllm.probes import RotaryAttentionProbe
from textscythe_vllm.processing import video_frames
from textscythe_vllm.request import BUDGET_FIELD, PruningRequest, PruningRequestError

logger = logging.getLogger(LOGGER_NAME)

#: Extra channels appended to each pruned row: (t, h, w), each as three base-256 digits (most significant
#: first). Digits 0..255 are exact in bf16, fp16 and fp32, so positions up to 2**24 - 1 survive any dtype.
POSITION_DIGITS = 3
POSITION_CHANNELS = 3 * POSITION_DIGITS
_DIGIT_BASE = 256


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



class MRopeProcessor:
    """Processor parts shared by the Qwen families (put in front of :class:`PruningProcessorMixin`): images and
    videos located by their pad tokens, items counted by their ``*_grid_thw``, and budgets refused while vLLM's
    own video pruning (EVS) owns the rows. ``counting_processor(modality)`` is the HF processor whose resize
    rules give an item's unpruned token count."""

    pruned_modalities = ("image", "video")

    def counting_processor(self, modality: str) -> Any:
        return self.info.get_image_processor()  # type: ignore[attr-defined]

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
        if isinstance(items, _vllm.EmbeddingItems):
            return items.get_feature_size(index)
        image_processor = self.counting_processor(modality)
        if modality == "image":
            size = items.get_image_size(index)
            return self.info.get_num_image_tokens(
                image_width=size.width, image_height=size.height, image_processor=image_processor, mm_kwargs={}
            )
        num_frames, width, height = video_frames(items, index)
        return self.info.get_num_video_tokens(
            image_width=width, image_height=height, num_frames=num_frames,
            image_processor=image_processor, mm_kwargs={},
        )


class MRopeRows:
    """Put in front of :class:`~textscythe_vllm.pruning.PruningModel` and an M-RoPE model class: the Qwen families'
    item counts, tower run and positions. The family
    sets ``_rows_width`` (the width of its multimodal rows without channels) and ``_positions_owned_by_vllm``
    (True while a vLLM mode such as EVS owns positions: then nothing here runs)."""

    _rows_width: int
    _positions_owned_by_vllm: bool = False
    _pending_positions: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def guarded_positions(layout: Callable[[], tuple[Tensor, int]], num_tokens: int) -> tuple[Tensor, int]:
        """``layout()``, checked: ``[3, num_tokens]`` positions and the delta. A layout that fails (a prompt the
        family's walk does not expect) must not kill the engine, which calls this for every request: the
        request then gets plain 1-D positions, and the error is logged."""
        try:
            positions, delta = layout()
            if tuple(positions.shape) != (3, num_tokens):
                raise RuntimeError(f"positions of shape {tuple(positions.shape)} for {num_tokens} tokens")
            return positions, delta
        except Exception:
            logger.exception("textscythe: M-RoPE layout of a pruned request failed; using 1-D positions")
            return torch.arange(num_tokens).expand(3, num_tokens).clone(), 0

    def pruning_enabled(self) -> bool:
        return not self._positions_owned_by_vllm

    def count_items(self, modality: str, modality_input: Any) -> int:
        return int(modality_input[f"{modality}_grid_thw"].shape[0])

    def features_and_attention(
        self, modality: str, modality_input: Any, probe: RotaryAttentionProbe | None,
        row_attention: Callable[[Tensor, list[list[int]]], list[Tensor]],
    ) -> tuple[list[Tensor], list[Tensor | None], float]:
        """``(rows per item, attention per item, probe seconds)``: the stock tower on the parsed input, with the probe
        over every image and video step (its ``cu_seqlens`` segments) when given; ``row_attention`` turns the
        per-patch scores into each item's per-row attention."""
        grid_thw = [[int(v) for v in row] for row in modality_input[f"{modality}_grid_thw"].tolist()]
        if probe is None or not modality_input["type"].startswith("pixel_values"):
            return self.stock_features(modality, modality_input), [None] * len(grid_thw), 0.0  # type: ignore[attr-defined]
        with probe.capture_segments([h * w for t, h, w in grid_thw for _ in range(t)]) as captured:
            rows = self.stock_features(modality, modality_input)  # type: ignore[attr-defined]
        if not captured:
            logger.warning("textscythe: the vision attention probe saw no forward pass; selecting without it")
            return rows, [None] * len(grid_thw), 0.0
        return rows, list(row_attention(captured[-1], grid_thw)), probe.seconds

    def with_position_channels(self, rows: Tensor, relative: Tensor) -> Tensor:
        """``[K, W]`` kept rows + their ``[3, K]`` relative positions -> ``[K, W + 9]``."""
        return torch.cat([rows, encode_positions(relative.to(rows.device), rows.dtype)], dim=1)

    def embed_input_ids(
        self, input_ids: Tensor, multimodal_embeddings: Any = None, *, is_multimodal: Tensor | None = None
    ) -> Tensor:
        self._pending_positions = None
        if not self._positions_owned_by_vllm and multimodal_embeddings is not None and len(multimodal_embeddings):
            multimodal_embeddings, self._pending_positions = split_position_channels(
                multimodal_embeddings, self._rows_width, is_multimodal
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
