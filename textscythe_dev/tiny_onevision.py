"""Tiny LLaVA-OneVision-shaped checkpoints, built locally, that vLLM serves on CPU.

The checkpoint keeps what matters for visual-token pruning in LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-*``):
a SigLIP-style tower without [CLS] (384 px, 14 px patches: 27 x 27 = 729 tokens per view, ``"full"`` feature
strategy, last layer), the real any-resolution grid (36 pinpoints, 384 to 2,304 px a side) with
``anyres_max_9`` (tiles beyond 9 views' worth are bilinearly down-sampled) and one ``image_newline`` row per tile
row, videos as 2x bilinear-pooled frames (14 x 14 = 196 tokens each) plus one trailing newline row, and a Qwen2
LLM -- at a tiny width and depth (tower: 2 layers of width 64; LLM: 2 layers of width 128, 2 heads of 64).

``with_weights=False`` writes config, tokenizer and processor only (serve with ``--load-format dummy``);
``with_weights=True`` also saves random, seeded float32 weights. Nothing is downloaded. The tokenizer is the
word-level vocabulary of :mod:`textscythe_dev.word_tokenizer` with Qwen's turn tokens plus ``<image>``
and ``<video>``; the chat template renders (images and videos where they appear in the content)::

    <|im_start|>user
    <image>
    what is this ?<|im_end|>
    <|im_start|>assistant

Command line::

    python -m textscythe_dev.tiny_onevision PATH [--with-weights]
"""

from __future__ import annotations

from pathlib import Path

from textscythe_dev.tiny_common import (
    CHATML_SPECIAL_TOKENS,
    TEXT_SIZES,
    VISION_SIZES,
    build_chatml_tokenizer,
    builder_argument_parser,
    chatml_text_token_ids,
    restore_vision_model_prefix,
    seed_image_newline,
    serve_command,
    write_checkpoint,
)
from textscythe_dev.word_tokenizer import im_chat_template, word_vocabulary

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# Order fixes the ids: <unk>=0, <|endoftext|>=1, <|im_start|>=2, <|im_end|>=3, <image>=4, <video>=5.
SPECIAL_TOKENS = (*CHATML_SPECIAL_TOKENS, IMAGE_TOKEN, VIDEO_TOKEN)

IMAGE_SIZE = 384
PATCH_SIZE = 14
TOKENS_PER_VIEW = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 729
TOKENS_PER_FRAME = ((IMAGE_SIZE // PATCH_SIZE + 1) // 2) ** 2  # 196 after 2x pooling
# llava-hf/llava-onevision-qwen2-*: every (height, width) of 1..6 tiles of 384 px.
GRID_PINPOINTS = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in range(1, 7) for cols in range(1, 7)]
MAX_POSITION_EMBEDDINGS = 32768

CHAT_TEMPLATE = im_chat_template(f"{IMAGE_TOKEN}\n", f"{VIDEO_TOKEN}\n")


def vocabulary() -> dict[str, int]:
    return word_vocabulary(SPECIAL_TOKENS)


def build_tokenizer():
    return build_chatml_tokenizer(
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def build_config(vocab_size: int, dtype: str = "float32"):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vocab = vocabulary()
    text_config = Qwen2Config(
        vocab_size=vocab_size, **TEXT_SIZES, max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        **chatml_text_token_ids(vocab), tie_word_embeddings=False, dtype=dtype,
    )
    vision_config = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION_SIZES, dtype=dtype)
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=vocab[IMAGE_TOKEN], video_token_index=vocab[VIDEO_TOKEN],
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS], vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.dtype = dtype
    return config


def build_processor(tokenizer):
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS])
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=TOKENS_PER_VIEW, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN, vision_aspect_ratio="anyres_max_9",
    )


def build_tiny_onevision(
    path: str | Path, *, with_weights: bool = False, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a tiny LLaVA-OneVision checkpoint directory to ``path`` and return it."""
    tokenizer = build_tokenizer()
    return write_checkpoint(
        path, kind="llava-onevision", config=build_config(len(tokenizer), dtype), tokenizer=tokenizer,
        processor=build_processor(tokenizer), with_weights=with_weights, seed=seed, dtype=dtype,
        adjust_weights=seed_image_newline,
        # transformers 5 drops the tower's vision_model. level, which vLLM needs
        rewrite_saved_weights=restore_vision_model_prefix,
    )


def main(argv: list[str] | None = None) -> int:
    args = builder_argument_parser("tiny_onevision").parse_args(argv)
    out = build_tiny_onevision(args.path, with_weights=args.with_weights, seed=args.seed)
    print(f"wrote tiny LLaVA-OneVision to {out} (serve: {serve_command(out, with_weights=args.with_weights)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
