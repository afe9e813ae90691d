"""Gemma 4 (``Gemma4ForConditionalGeneration``) with TextScythe pruning of images and videos.

Visual tokens (*soft tokens*): the vision tower's output pooled 3 x 3 (``pooling_kernel_size``) by patch position,
one row per pooled cell in raster order (row of cells, then column), padding stripped, then projected
(``embed_vision``). An image has at most ``max_soft_tokens`` rows (the checkpoint's ``default_output_length``, or
the server's ``--mm-processor-kwargs '{"max_soft_tokens": ...}'``, or a request's ``mm_processor_kwargs``
``max_soft_tokens`` -- Gemma 4's own way to lower an image's resolution, admitted when it is one of Gemma 4's
values and not above the server's; budgets then count those rows); a video is its frames, each encoded as an
image of at most 70 rows and preceded in the prompt by an ``mm:ss`` timestamp. The budget counts the rows of each
image, and of each video over all its frames; a video's budget is shared between its frames by
:func:`~textscythe_vllm.processing.spread_budget` (each frame's placeholder run is trimmed to its quota, its
timestamp and ``<|image>`` / ``<image|>`` markers stay) and each frame keeps its quota of its own rows
(``EncodedItems.segments``).

Attention (no [CLS] token): for each soft token, the mean over the patches pooled into it of the attention each
patch *receives* at the last encoder layer::

    a_p = 1/H * sum_h  1/L * sum_{i valid}  softmax_{j valid}( q_i^h . k_j^h )_p      (patch p, scale 1.0)
    A_m = 1/|P(m)| * sum_{p in P(m)} a_p                                               (soft token m)

over the ``L`` valid (non-padding) patches of the image or frame -- padding patches, at position ``(-1, -1)``,
neither send nor receive attention -- with ``q``, ``k`` that layer's queries and keys after their per-head RMS norm
and 2-D RoPE; ``P(m)`` are the patches pooled into soft token ``m``. They are read off vLLM's own forward pass of
the (transformers) tower by hooks (:class:`~textscythe_vllm.probes.NormedRotaryAttentionProbe`); the column means
are computed per image in query chunks, so no ``L x L`` matrix is held whole and the attention backend is
untouched. The encoder batches images by patch count, so each scored row is matched to its image by its patch
positions.

Positions are 1-D: the kept rows take consecutive positions, as any prompt's tokens do. Pruned requests need the
eager vision encoder: encoder CUDA graphs are turned off for this model.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, explain
from textscythe_vllm._vllm import (
    GEMMA4_SUPPORTED_SOFT_TOKENS,
    GEMMA4_VIDEO_SOFT_TOKENS,
    MULTIMODAL_REGISTRY,
    Gemma4DummyInputsBuilder,
    Gemma4ForConditionalGeneration,
    Gemma4MultiModalProcessor,
    Gemma4ProcessingInfo,
    gemma4_configured_soft_tokens,
    gemma4_num_soft_tokens,
)
from textscythe_vllm.plugin import REQUEST_PROCESSOR_OPTIONS
from textscythe_vllm.probes import NormedRotaryAttentionProbe
from textscythe_vllm.processing import (
    PruningProcessorMixin,
    request_options_in_flight,
    video_frames,
    with_plugin_context,
)
from textscythe_vllm.pruning import EncodedItems, PruningModel
from textscythe_vllm.request import PruningRequestError

logger = logging.getLogger(LOGGER_NAME)

MODALITIES = ("image", "video")
#: per modality: the key of the parsed input's per-view patch positions
POSITION_KEYS = {"image": "pixel_position_ids", "video": "pixel_position_ids_videos"}


SOFT_TOKENS_OPTION = "max_soft_tokens"


def configured_soft_tokens(info: Any) -> int | None:
    """The server's image ``max_soft_tokens`` (``--mm-processor-kwargs``), resolved as stock vLLM resolves it for
    placeholders; ``None``: the checkpoint's default."""
    value, _ = gemma4_configured_soft_tokens(info.ctx.get_merged_mm_kwargs({}))
    return value if isinstance(value, int) and value in GEMMA4_SUPPORTED_SOFT_TOKENS else None


def server_soft_tokens(info: Any) -> int:
    """The most soft tokens the server gives an image: its ``max_soft_tokens``, else the checkpoint's default."""
    configured = configured_soft_tokens(info)
    return configured if configured is not None else int(info.get_hf_config().vision_config.default_output_length)


def soft_token_cells(position_ids: Tensor, kernel: int) -> tuple[Tensor, Tensor, int]:
    """``(cell [V], valid [P], cols)`` of one image's or frame's ``[P, 2]`` (x, y) patch positions: the soft token
    (0..N-1, in the order vLLM keeps the pooled rows) each of its ``V`` valid patches is pooled into, which patches
    are valid (not ``(-1, -1)``), and the soft tokens per row.

    The cell of a patch is ``x // k + cols * (y // k)`` with ``cols = (max x + 1) // k`` -- the pooler's own
    index -- and vLLM keeps the cells any patch falls in, in index order: renumbering the used cells in order
    gives each patch its row.
    """
    valid = ~(position_ids == -1).all(dim=-1)  # [P]
    patches = position_ids[valid].long()  # [V, 2]
    cols = (int(patches[:, 0].max()) + 1) // kernel
    index = patches[:, 0] // kernel + cols * (patches[:, 1] // kernel)  # [V]
    _, cell = torch.unique(index, sorted=True, return_inverse=True)
    return cell, valid, cols


def soft_token_attention(patch_attention: Tensor, position_ids: Tensor, kernel: int) -> Tensor:
    """``[N]``: for each soft token, the mean of ``patch_attention`` (``[P]``, one value per patch) over the valid
    patches pooled into it."""
    cell, valid, _ = soft_token_cells(position_ids, kernel)
    count = int(cell.max()) + 1
    sums = torch.zeros(count, dtype=torch.float32, device=patch_attention.device)
    sums.index_add_(0, cell, patch_attention[valid].float())
    sizes = torch.zeros_like(sums).index_add_(0, cell, torch.ones_like(sums[:1]).expand(cell.shape[0]))
    return sums / sizes


def match_scored_rows(scores: list[Tensor], positions: list[Tensor], views: list[Tensor]) -> list[Tensor] | None:
    """Per view (image or frame, ``[P, 2]`` positions, in item order): its ``[P]`` row of the probe's scores.

    The encoder runs views in its own order (grouped by patch count, in chunks) and may pad them further, so each
    view takes the first unused scored row with its positions (and only padding after them); views with equal
    positions keep their order in every encoder batch. ``None`` when a view has no such row.
    """
    rows = [(score[b], position[b]) for score, position in zip(scores, positions, strict=True)
            for b in range(score.shape[0])]
    used = [False] * len(rows)
    matched = []
    for view in views:
        length = view.shape[0]
        found = next((index for index, (_, position) in enumerate(rows)
                      if not used[index] and position.shape[0] >= length
                      and torch.equal(position[:length], view.to(position))
                      and bool((position[length:] == -1).all())), None)
        if found is None:
            return None
        used[found] = True
        matched.append(rows[found][0][:length])
    return matched


class TextScytheGemma4MultiModalProcessor(PruningProcessorMixin, Gemma4MultiModalProcessor):
    pruned_modalities = MODALITIES
    request_option_keys = REQUEST_PROCESSOR_OPTIONS["Gemma4ForConditionalGeneration"]

    def request_processor_options(self, options: Mapping[str, object]) -> dict[str, object]:
        if options.get(SOFT_TOKENS_OPTION) is None:  # unset, as stock vLLM reads a null
            return {}
        value, ceiling = options[SOFT_TOKENS_OPTION], server_soft_tokens(self.info)
        # Above the server's value a client would buy more soft tokens per image than the operator configured
        # and vLLM planned its encoder budget for (stock vLLM serves that).
        allowed = [tokens for tokens in GEMMA4_SUPPORTED_SOFT_TOKENS if tokens <= ceiling]
        if type(value) is not int or value not in allowed:
            raise PruningRequestError(
                SOFT_TOKENS_OPTION, f"'{SOFT_TOKENS_OPTION}' must be one of {allowed} on this server (Gemma 4's "
                f"values up to the server's {ceiling}), got {reprlib.repr(value)}")
        return {SOFT_TOKENS_OPTION: value}

    def placeholder_token_ids(self, modality: str = "image") -> list[int]:
        config = self.info.get_hf_config()
        return [config.image_token_id if modality == "image" else config.video_token_id]

    def _num_processed_items(self, processed_data: Any, modality: str = "image") -> int:
        if modality == "image":
            return super()._num_processed_items(processed_data, modality)
        counts = processed_data.get("video_frame_counts")  # frames are stored flat; one count per video
        return 0 if counts is None else len(counts)

    def _unpruned_token_count(self, items: Any, index: int, modality: str = "image") -> int:
        if modality == "image":
            size = items.get_image_size(index)
            requested = request_options_in_flight().get(SOFT_TOKENS_OPTION)
            soft_tokens = requested if isinstance(requested, int) else configured_soft_tokens(self.info)
            return gemma4_num_soft_tokens(self.info, size.width, size.height, soft_tokens)
        num_frames, width, height = video_frames(items, index)  # Gemma 4's videos carry metadata
        return num_frames * gemma4_num_soft_tokens(self.info, width, height, GEMMA4_VIDEO_SOFT_TOKENS)


@MULTIMODAL_REGISTRY.register_processor(
    TextScytheGemma4MultiModalProcessor,
    info=with_plugin_context(Gemma4ProcessingInfo),
    dummy_inputs=Gemma4DummyInputsBuilder,
)
class TextScytheGemma4ForConditionalGeneration(PruningModel, Gemma4ForConditionalGeneration):
    pruned_modalities = MODALITIES

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope

        attention = self.vision_tower.encoder.layers[-1].self_attn
        vision = attention.config
        # the tower is transformers' module: its own RoPE function rotates the probe's queries and keys
        self.attention_probe = NormedRotaryAttentionProbe(
            attention, apply_multidimensional_rope, num_heads=vision.num_attention_heads,
            num_key_value_heads=vision.num_key_value_heads, scale=attention.scaling,
        )
        self.pooling_kernel = int(vision.pooling_kernel_size)

    def count_items(self, modality: str, modality_input: Any) -> int:
        if modality == "image":
            return len(modality_input["pixel_values"])
        return len(modality_input["video_frame_counts"])  # frames are flat; one count per video

    def encode_items(self, modality: str, modality_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        views = list(modality_input[POSITION_KEYS[modality]])  # per image or frame: [P, 2] (x, y), -1 = padding
        view_attention: list[Tensor] | None = None
        seconds = 0.0
        if not with_attention:
            features = self.stock_features(modality, modality_input)
        else:
            with self.attention_probe.capture() as captured:
                features = self.stock_features(modality, modality_input)
            seconds = self.attention_probe.seconds
            scored = match_scored_rows(captured, self.attention_probe.positions, views)
            if scored is None:
                logger.warning("textscythe: Gemma 4 attention rows do not match the %s batch; selecting without "
                               "attention", modality)
            else:
                view_attention = [soft_token_attention(row, view, self.pooling_kernel)
                                  for row, view in zip(scored, views, strict=True)]
        cells = [soft_token_cells(view, self.pooling_kernel) for view in views]
        counts = [int(cell.max()) + 1 for cell, _, _ in cells]  # soft tokens per view
        if modality == "image":
            frames_per_item = [1] * len(views)
        else:
            frames_per_item = [int(count) for count in torch.as_tensor(modality_input["video_frame_counts"]).tolist()]
        encoded = EncodedItems(features, [], None, [] if with_layouts else None, seconds,
                               [] if modality == "video" else None)
        first = 0
        for frames in frames_per_item:
            part = slice(first, first + frames)
            first += frames
            if view_attention is None:
                encoded.attention.append(None)
            else:
                encoded.attention.append(torch.cat(view_attention[part]).to(features[len(encoded.attention)].device))
            if encoded.segments is not None:
                encoded.segments.append(counts[part])  # each frame keeps its quota; timestamps stay between
            if encoded.layouts is not None:
                cols = cells[part.start][2]
                encoded.layouts.append(explain.patch_grid(counts[part.start] // cols, cols, frames, region="whole"))
        return encoded

    def get_encoder_cudagraph_config(self) -> Any:
        # Captured encoder graphs bypass embed_multimodal (no pruning: more rows than placeholders).
        return replace(super().get_encoder_cudagraph_config(), modalities=[])
