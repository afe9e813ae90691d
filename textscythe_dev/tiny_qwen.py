"""Tiny Qwen2.5-VL-shaped checkpoints, built locally, that vLLM serves on CPU.

The checkpoint has the structure that matters for visual-token pruning in Qwen2.5-VL -- a windowed ViT with
full-attention blocks (``fullatt_block_indexes``), 14 px patches, 2x2 patch merging, 2-frame temporal patches,
M-RoPE in the LLM (``mrope_section``) and the Qwen special tokens -- at a tiny width and depth:

* vision tower: 4 blocks (full attention in blocks 1 and 3, 112 px windows elsewhere), width 64, 2 heads;
* LLM: 2 Qwen2 layers, width 128, 2 heads of 64 (vLLM's CPU attention needs head_dim in {32, 64, ...}),
  ``mrope_section`` [8, 12, 12].

``with_weights=False`` writes config, tokenizer and processor only (serve with ``--load-format dummy``);
``with_weights=True`` also saves random, seeded float32 weights that both transformers and vLLM load, for
HF-vs-vLLM equivalence tests, with sharpened attention (:func:`sharpen_attention`) and ``rope_theta`` 10,000 so
that outputs depend clearly on positions. Nothing is downloaded.

The tokenizer is the word-level vocabulary of :mod:`textscythe_dev.tiny_models` plus Qwen's special
tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ``<|video_pad|>``, ...), and
the chat template renders Qwen2.5-VL's format (without the default system prompt)::

    <|im_start|>user
    <|vision_start|><|image_pad|><|vision_end|>what is this ?<|im_end|>
    <|im_start|>assistant

Command line::

    python -m textscythe_dev.tiny_qwen PATH [--with-weights]
"""

from __future__ import annotations

from pathlib import Path

from textscythe_dev.tiny_common import (
    CHATML_SPECIAL_TOKENS,
    IM_START,
    TEXT_SIZES,
    build_chatml_tokenizer,
    builder_argument_parser,
    chatml_text_token_ids,
    scale_fused_query_key,
    scale_projections,
    scene_video,
    serve_command,
    write_checkpoint,
)
from textscythe_dev.word_tokenizer import im_chat_template, word_vocabulary

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Order fixes the ids: <unk>=0, <|endoftext|>=1, <|im_start|>=2, <|im_end|>=3, <|vision_start|>=4,
# <|vision_end|>=5, <|image_pad|>=6, <|video_pad|>=7.
SPECIAL_TOKENS = (*CHATML_SPECIAL_TOKENS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Pixel bounds of one image / video frame after the processor's resize (multiples of 28 px a side).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 336 * 336  # at most 24 x 24 patches = 144 visual tokens per image or per 2-frame video step
MAX_POSITION_EMBEDDINGS = 8192
TOKENS_PER_SECOND = 2

# As in Qwen's own tokenizer, every control token is special (``all_special_ids``).
QWEN_CONTROL_TOKENS = (IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

CHAT_TEMPLATE = im_chat_template(VISION_START + IMAGE_PAD + VISION_END, VISION_START + VIDEO_PAD + VISION_END)


def vocabulary() -> dict[str, int]:
    return word_vocabulary(SPECIAL_TOKENS)


def build_tiny_qwen_tokenizer():
    """A ``PreTrainedTokenizerFast`` with Qwen2.5-VL's special tokens and chat format (word-level, lower-cased)."""
    return build_chatml_tokenizer(
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens=list(QWEN_CONTROL_TOKENS),
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def build_config(vocab_size: int, dtype: str = "float32"):
    from transformers import Qwen2_5_VLConfig

    vocab = vocabulary()
    text_config = dict(
        vocab_size=vocab_size,
        **TEXT_SIZES,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        **chatml_text_token_ids(vocab),
        tie_word_embeddings=False,
        dtype=dtype,
    )
    vision_config = dict(
        depth=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=128,
        fullatt_block_indexes=[1, 3],
        window_size=112,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        tokens_per_second=TOKENS_PER_SECOND,
        hidden_act="silu",
        in_channels=3,
        dtype=dtype,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=vocab[IMAGE_PAD],
        video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START],
        vision_end_token_id=vocab[VISION_END],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = dtype
    return config


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    common = dict(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
    )
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen2VLVideoProcessor(**common, min_frames=2, max_frames=32, cap_pixels_per_frame=False)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_video(seed: int, num_frames: int = 8, width: int = 168, height: int = 112, fps: float = 2.0):
    """:func:`~textscythe_dev.tiny_common.scene_video` at a size that suits this model (8 frames: 4 temporal
    patches of 2)."""
    return scene_video(seed, num_frames, width, height, fps)


def sharpen_attention(model, text_scale: float = 8.0, vision_scale: float = 4.0) -> None:
    """Scale the query and key projections of random weights so attention is far from uniform and outputs depend
    clearly on positions (M-RoPE) and on which visual tokens receive attention (see
    :func:`~textscythe_dev.tiny_common.scale_projections`)."""
    layers = model.model.language_model.layers
    scale_projections((p for layer in layers for p in (layer.self_attn.q_proj, layer.self_attn.k_proj)), text_scale)
    scale_fused_query_key((block.attn.qkv for block in model.model.visual.blocks), vision_scale)


def build_tiny_qwen2_5_vl(
    path: str | Path, *, with_weights: bool = False, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint directory to ``path`` and return it."""
    tokenizer = build_tiny_qwen_tokenizer()
    return write_checkpoint(
        path, kind="qwen2.5-vl", config=build_config(len(tokenizer), dtype), tokenizer=tokenizer,
        processor=build_processor(tokenizer), with_weights=with_weights, seed=seed, dtype=dtype,
        adjust_weights=sharpen_attention,
    )


def main(argv: list[str] | None = None) -> int:
    args = builder_argument_parser("tiny_qwen").parse_args(argv)
    out = build_tiny_qwen2_5_vl(args.path, with_weights=args.with_weights, seed=args.seed)
    print(f"wrote tiny Qwen2.5-VL to {out} (serve: {serve_command(out, with_weights=args.with_weights)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
