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

import argparse
import json
from pathlib import Path

from textscythe_dev.word_tokenizer import build_word_tokenizer, im_chat_template, word_vocabulary

UNK_TOKEN = "<unk>"
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Order fixes the ids: <unk>=0, <|endoftext|>=1, <|im_start|>=2, <|im_end|>=3, <|vision_start|>=4,
# <|vision_end|>=5, <|image_pad|>=6, <|video_pad|>=7.
SPECIAL_TOKENS = (UNK_TOKEN, ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Pixel bounds of one image / video frame after the processor's resize (multiples of 28 px a side).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 336 * 336  # at most 24 x 24 patches = 144 visual tokens per image or per 2-frame video step
MAX_POSITION_EMBEDDINGS = 8192
TOKENS_PER_SECOND = 2

CHAT_TEMPLATE = im_chat_template(VISION_START + IMAGE_PAD + VISION_END, VISION_START + VIDEO_PAD + VISION_END)


def vocabulary() -> dict[str, int]:
    return word_vocabulary(SPECIAL_TOKENS)


def build_tiny_qwen_tokenizer():
    """A ``PreTrainedTokenizerFast`` with Qwen2.5-VL's special tokens and chat format (word-level, lower-cased)."""
    return build_word_tokenizer(
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        # as in Qwen's own tokenizer, every control token is special (``all_special_ids``)
        extra_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def build_config(vocab_size: int, dtype: str = "float32"):
    from transformers import Qwen2_5_VLConfig

    vocab = vocabulary()
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=vocab[ENDOFTEXT],
        eos_token_id=vocab[IM_END],
        pad_token_id=vocab[ENDOFTEXT],
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
    """``(frames [T, H, W, 3] uint8, metadata)``: a deterministic clip of :func:`~textscythe_dev.images.scene`
    pictures (a new scene every frame), in the ``(video, metadata)`` form vLLM's Qwen2.5-VL parser expects."""
    import numpy as np

    from textscythe_dev.images import scene

    frames = np.stack([np.asarray(scene(seed * 1000 + index, width, height)) for index in range(num_frames)])
    metadata = {
        "fps": fps, "duration": num_frames / fps, "total_num_frames": num_frames,
        "frames_indices": list(range(num_frames)), "video_backend": "opencv", "do_sample_frames": False,
    }
    return frames, metadata


def sharpen_attention(model, text_scale: float = 8.0, vision_scale: float = 4.0) -> None:
    """Scale the query and key projections of random weights so attention is far from uniform.

    With the default initialisation (std 0.02) a tiny random model attends almost uniformly: its output then
    barely depends on positions (M-RoPE) or on which visual tokens receive attention, and a test could not
    tell right positions from wrong ones. Scaling q and k by ``s`` multiplies every attention logit by ``s**2``.
    """
    import torch

    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(text_scale)
                if projection.bias is not None:
                    projection.bias.mul_(text_scale)
        for block in model.model.visual.blocks:
            width = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[: 2 * width].mul_(vision_scale)  # rows: q, then k, then v
            block.attn.qkv.bias[: 2 * width].mul_(vision_scale)


def build_tiny_qwen2_5_vl(
    path: str | Path, *, with_weights: bool = False, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint directory to ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_qwen_tokenizer()
    config = build_config(len(tokenizer), dtype)
    processor = build_processor(tokenizer)
    for stale in path.glob("*.safetensors"):
        stale.unlink()
    if with_weights:
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        sharpen_attention(model)
        model.save_pretrained(path, safe_serialization=True, max_shard_size="10GB")
    else:
        config.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(path / "textscythe_tiny_model.json", "w") as f:
        json.dump({"kind": "qwen2.5-vl", "with_weights": with_weights, "seed": seed, "dtype": dtype}, f, indent=2)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m textscythe_dev.tiny_qwen")
    parser.add_argument("path", type=Path)
    parser.add_argument("--with-weights", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_qwen2_5_vl(args.path, with_weights=args.with_weights, seed=args.seed)
    load = "" if args.with_weights else " --load-format dummy"
    print(f"wrote tiny Qwen2.5-VL to {out} (serve: vllm serve {out}{load} --enforce-eager)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
