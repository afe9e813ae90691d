"""Tiny LLaVA-shaped checkpoints, built locally, that vLLM serves on CPU.

The checkpoints have the real *shapes* that matter for visual-token pruning (a CLIP ViT-L/14-336 style
tower: 336 px, 14 px patches, 576 image tokens per LLaVA-1.5 image; LLaVA-NeXT's any-resolution tiling
with up to 2,928 tokens per image), but a tiny width and depth, so they start in seconds on CPU:

* ``with_weights=False`` (default): config, tokenizer and processor only. Serve with
  ``vllm serve PATH --load-format dummy`` (random weights made by vLLM).
* ``with_weights=True``: also random, seeded weights saved with ``save_pretrained`` as safetensors, with
  the key names vLLM 0.32's loader expects (and transformers still loads), so the HF model and vLLM can
  be compared on the same weights.

Nothing is downloaded. The tokenizer is a word-level ``tokenizers`` model over a small English
vocabulary (lower-cased; unknown words map to ``<unk>``) with ``<image>`` as a special token, and the
chat template follows LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:`` format.

Command line::

    python -m textscythe_dev.tiny_models PATH [--kind llava-1.5|llava-next] [--with-weights]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textscythe_dev.tiny_common import (
    TEXT_SIZES,
    VISION_SIZES,
    builder_argument_parser,
    restore_vision_model_prefix,
    seed_image_newline,
    serve_command,
    write_checkpoint,
)
from textscythe_dev.word_tokenizer import build_word_tokenizer, word_vocabulary

KINDS = ("llava-1.5", "llava-next")

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)

PATCH_SIZE = 14
IMAGE_SIZE = 336
# LLaVA-v1.6 (llava-hf/llava-v1.6-*) any-resolution grid, as [height, width].
LLAVA_NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
MAX_POSITION_EMBEDDINGS = 4096

# LLaVA-1.5 style: "<s>USER: <image>\nWhat is this? ASSISTANT: answer</s>USER: ... ASSISTANT:".
# Content may be a string (which may itself contain "<image>") or a list of OpenAI-style parts; image
# parts ("image", "image_url", "image_pil") render as "<image>\n" where they appear.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url', 'image_pil'] -%}"
    "{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + part['text'] + ('' if loop.last else ' ') -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = ns.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + eos_token -}}"
    "{%- else -%}"
    "{{- 'USER: ' + text + ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- 'ASSISTANT:' -}}"
    "{%- endif -%}"
)


def vocabulary() -> dict[str, int]:
    """Token -> id for the tiny word-level tokenizer (special tokens first, then punctuation, digits, words)."""
    return word_vocabulary(SPECIAL_TOKENS)


def build_tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary`, with the LLaVA-style chat template."""
    return build_word_tokenizer(
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def _text_config(vocab_size: int, dtype: str, overrides: dict[str, Any] | None = None):
    from transformers import LlamaConfig

    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        **TEXT_SIZES,
        head_dim=64,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    fields.update(overrides or {})
    return LlamaConfig(**fields)


def _vision_config(dtype: str, overrides: dict[str, Any] | None = None):
    from transformers import CLIPVisionConfig

    fields: dict[str, Any] = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        **VISION_SIZES,
        projection_dim=64,
        dtype=dtype,
    )
    fields.update(overrides or {})
    return CLIPVisionConfig(**fields)


def _build_config(kind: str, vocab_size: int, image_token_id: int, dtype: str,
                  text_overrides: dict[str, Any] | None = None, vision_overrides: dict[str, Any] | None = None):
    common: dict[str, Any] = dict(
        vision_config=_vision_config(dtype, vision_overrides),
        text_config=_text_config(vocab_size, dtype, text_overrides),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    if kind == "llava-1.5":
        from transformers import LlavaConfig

        config = LlavaConfig(**common, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
        config.architectures = ["LlavaForConditionalGeneration"]
    else:
        from transformers import LlavaNextConfig

        config = LlavaNextConfig(
            **common,
            image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_GRID_PINPOINTS],
            image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        )
        config.architectures = ["LlavaNextForConditionalGeneration"]
    config.dtype = dtype
    return config


def _build_processor(kind: str, tokenizer):
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if kind == "llava-1.5":
        from transformers import CLIPImageProcessor, LlavaProcessor

        image_processor = CLIPImageProcessor(size=size, crop_size=crop)
        processor_cls = LlavaProcessor
    else:
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        image_processor = LlavaNextImageProcessor(
            size=size, crop_size=crop, image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_GRID_PINPOINTS]
        )
        processor_cls = LlavaNextProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_tiny_llava(
    path: str | Path,
    *,
    kind: str = "llava-1.5",
    with_weights: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    text_config: dict[str, Any] | None = None,
    vision_config: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny LLaVA-1.5 or LLaVA-NeXT checkpoint directory to ``path`` and return it.

    The directory holds ``config.json``, the tokenizer, the image processor and the processor (with its
    chat template); with ``with_weights=True`` also ``model.safetensors`` with random weights drawn from
    ``seed``. Without weights, load it in vLLM with ``--load-format dummy``.

    ``text_config`` / ``vision_config`` override fields of the ``LlamaConfig`` / ``CLIPVisionConfig`` (e.g.
    ``{"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 2, "num_attention_heads": 32,
    "num_key_value_heads": 32, "head_dim": 128}`` for LLaVA-1.5-7B's width, as ``benchmarks/serving.py``
    does); ``image_size`` and ``patch_size`` of the tower are fixed by the processor and must not change.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    fixed = {"image_size", "patch_size"} & set(vision_config or {})
    if fixed:
        raise ValueError(f"vision_config must not override {sorted(fixed)} (the processor fixes them)")

    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = _build_config(kind, len(tokenizer), image_token_id, dtype, text_config, vision_config)
    overrides = dict(text_config=text_config or {}, vision_config=vision_config or {})
    return write_checkpoint(
        path, kind=kind, config=config, tokenizer=tokenizer, processor=_build_processor(kind, tokenizer),
        with_weights=with_weights, seed=seed, dtype=dtype,
        adjust_weights=seed_image_newline if kind == "llava-next" else None,
        # transformers 5 drops the CLIP tower's vision_model. level, which vLLM needs
        rewrite_saved_weights=restore_vision_model_prefix,
        marker_fields=overrides if text_config or vision_config else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = builder_argument_parser("tiny_models", "Write a tiny LLaVA-shaped checkpoint that vLLM serves on CPU.")
    parser.add_argument("--kind", choices=KINDS, default="llava-1.5")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    out = build_tiny_llava(
        args.path, kind=args.kind, with_weights=args.with_weights, seed=args.seed, dtype=args.dtype
    )
    print(f"wrote {args.kind} tiny model to {out} (serve: {serve_command(out, with_weights=args.with_weights)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
