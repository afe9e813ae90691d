"""The shape of Qwen3-VL-8B, an analytic FLOP model of serving it, and depth-cut checkpoints of it.

Used by ``benchmarks/serving.py --shape qwen3-vl-8b``, as :mod:`textscythe_dev.llava_7b_shape` is for the LLaVA
shapes: width, token counts and image size are the real model's, so every GEMM has the real shape; only the depth is
cut -- fewer LLM layers and fewer ViT blocks, the ViT depth chosen so that the served model keeps the real model's
ratio of vision-side FLOPs to LLM-prefill FLOPs.

Qwen3-VL-8B (``Qwen/Qwen3-VL-8B-Instruct``):

* vision: a ViT of 27 blocks, width 1152, 16 heads of 72, MLP 4304 (not gated), 16 px patches over 2-frame temporal
  patches (an image is its frame twice: one Conv3d over 3 x 2 x 16 x 16), learned position embeddings (a 48 x 48
  grid, interpolated) plus 2-D rotary, full attention over each image's patches; the merger (LayerNorm, then
  4 x 1152 -> 4 x 1152 -> 4096 on each 2 x 2 block of patches) makes one LLM token per block; DeepStack: the outputs
  of blocks 8, 16 and 24 go through three more mergers (post-shuffle LayerNorm, same GEMMs) and are *added* to the
  hidden states after LLM layers 0, 1 and 2 at the visual positions;
* LLM: Qwen3-8B -- 36 layers, width 4096, 32 query heads and 8 KV heads of 128, gated MLP 12288, vocabulary
  151,936, interleaved M-RoPE (``mrope_section`` [24, 20, 20]). No projector beyond the merger.

The benchmark's image is 1024 x 1024 px: 64 x 64 patches, 32 x 32 = 1,024 visual tokens (the processor's
``max_pixels`` is set to exactly that, so vLLM's profiling uses the same image). The served vocabulary is the tiny
word-level tokenizer's (:func:`textscythe_dev.tiny_qwen3_vl.build_tiny_qwen3_vl_tokenizer`), as the LLaVA shapes
serve theirs; the FLOP model counts the real vocabulary's logits (one position).

A depth-cut tower keeps every DeepStack level: the real taps (8, 16, 24 of 27) are mapped proportionally onto the
cut tower (:func:`cut_deepstack_indexes`; 3 blocks: 0, 1, 2), so the tower needs at least 3 blocks, and the LLM at
least 3 layers to add all three levels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: Qwen3-8B (Qwen3-VL-8B's LLM), the fields the FLOP model and the checkpoint need.
REAL_TEXT = {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 128, "num_hidden_layers": 36, "vocab_size": 151936}
#: Qwen3-VL-8B's ViT. ``image_size`` is not a config field (Qwen3-VL takes any size): it is the benchmark's image
#: side, which fixes the patch count the FLOP model uses.
REAL_VISION = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
               "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
               "deepstack_visual_indexes": [8, 16, 24], "num_position_embeddings": 2304, "image_size": 1024}
REAL_VISION_LAYERS = REAL_VISION["depth"]  # Qwen3-VL runs every block (the merger sits after the last)
MROPE_SECTION = [24, 20, 20]
ROPE_THETA = 5_000_000.0
IMAGE_PX = 1024
MIN_PIXELS = 256 * 256
MAX_PIXELS = IMAGE_PX * IMAGE_PX  # 1024 x 1024: 1,024 visual tokens, the most one image gets
MAX_POSITION_EMBEDDINGS = 8192  # served (the real 262,144 would make vLLM reserve KV cache for it)
MIN_VISION_LAYERS = len(REAL_VISION["deepstack_visual_indexes"])  # one block per DeepStack level

#: Tiny widths for ``--quick`` (the smoke run; the same structure as :mod:`textscythe_dev.tiny_qwen3_vl`).
TINY_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2,
             "head_dim": 64, "num_hidden_layers": 2}
TINY_VISION = {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
               "deepstack_visual_indexes": [1, 2], "num_position_embeddings": 576}
TINY_MROPE_SECTION = [12, 10, 10]


def image_patches(vision: dict[str, Any]) -> int:
    """Patches of the benchmark's square image (one temporal patch: an image is its frame twice)."""
    return (vision["image_size"] // vision["patch_size"]) ** 2


def visual_tokens(vision: dict[str, Any]) -> int:
    """Merged rows (LLM tokens) of the benchmark's image: 1,024 for 1024 x 1024 px."""
    return image_patches(vision) // vision["spatial_merge_size"] ** 2


def llm_prefill_flops(tokens: int, visual: int, text: dict[str, Any], deepstack_levels: int) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one prefill: per layer the QKV/O and gated-MLP GEMMs and causal attention (QK^T
    and AV over the lower triangle, GQA: the query heads' work), logits for the last position only, and DeepStack's
    additions (one add per visual row element per level). Norms (incl. q/k norms), M-RoPE, activations and the
    embedding lookup are left out (< 1%)."""
    h, inter = text["hidden_size"], text["intermediate_size"]
    q_dim = text["num_attention_heads"] * text["head_dim"]
    kv_dim = text["num_key_value_heads"] * text["head_dim"]
    layers = text["num_hidden_layers"]
    gemm_per_token = 2 * (h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * inter)
    attention = 2 * 2 * q_dim * tokens * (tokens + 1) / 2
    return {"gemm": layers * tokens * gemm_per_token, "attention": layers * attention,
            "lm_head": 2 * h * text["vocab_size"], "deepstack_adds": min(deepstack_levels, layers) * visual * h}


def vision_flops(views: int, vision: dict[str, Any], layers_run: int, llm_hidden: int) -> dict[str, float]:
    """FLOPs of the vision side for ``views`` images of the benchmark's size: the patch embedding (a Conv3d over
    3 x 2 x 16 x 16 per patch), ``layers_run`` ViT blocks over the image's patches (QKV/O and MLP GEMMs, full
    attention within the image), and the mergers -- the main one and one per DeepStack level, each 4c -> 4c -> D on
    every 2 x 2 block (``projector``: Qwen3-VL has no other). ``llm_hidden`` is the mergers' output width (the
    config's ``out_hidden_size``, which equals it)."""
    c, inter = vision["hidden_size"], vision["intermediate_size"]
    seq = image_patches(vision)
    merged = visual_tokens(vision)
    unit = c * vision["spatial_merge_size"] ** 2
    per_layer = 2 * seq * (4 * c * c + 2 * c * inter) + 2 * 2 * c * seq * seq
    patch_embed = 2 * seq * 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2 * c
    mergers = 1 + len(vision.get("deepstack_visual_indexes") or [])
    projector = views * mergers * 2 * merged * (unit * unit + unit * llm_hidden)
    return {"tower": views * (layers_run * per_layer + patch_embed), "projector": projector}


def request_flops(text_tokens: int, visual_tokens: int, views: int, text: dict[str, Any], vision: dict[str, Any],
                  vision_layers: int) -> dict[str, float]:
    """The FLOPs of one request of ``text_tokens`` text and ``visual_tokens`` (kept) visual tokens from ``views``
    images (0: text only): the same keys as :func:`textscythe_dev.llava_7b_shape.request_flops` plus
    ``deepstack_adds`` (LLM side)."""
    levels = len(vision.get("deepstack_visual_indexes") or []) if views else 0
    llm = llm_prefill_flops(text_tokens + visual_tokens, visual_tokens, text, levels)
    vis = vision_flops(views, vision, vision_layers, text["hidden_size"]) if views else {"tower": 0, "projector": 0}
    parts = {"vision_tower": vis["tower"], "projector": vis["projector"], "llm_gemm": llm["gemm"],
             "llm_attention": llm["attention"], "lm_head": llm["lm_head"], "deepstack_adds": llm["deepstack_adds"]}
    return {**parts, "total": sum(parts.values())}


def vision_llm_ratio(text_tokens: int, num_visual: int, views: int, text: dict[str, Any], vision: dict[str, Any],
                     vision_layers: int) -> float:
    """(tower + mergers) / LLM prefill FLOPs of an unpruned request."""
    flops = request_flops(text_tokens, num_visual, views, text, vision, vision_layers)
    vision_side = flops["vision_tower"] + flops["projector"]
    return vision_side / (flops["total"] - vision_side)


def derive_vision_layers(llm_layers: int, text_tokens: int, num_visual: int, views: int = 1) -> int:
    """The ViT depth (3..27: one block per DeepStack level at least) whose vision/LLM FLOP ratio is closest (in
    log) to the real model's, with ``llm_layers`` of the 36 LLM layers."""
    real = vision_llm_ratio(text_tokens, num_visual, views, REAL_TEXT, REAL_VISION, REAL_VISION_LAYERS)
    served_text = {**REAL_TEXT, "num_hidden_layers": llm_layers}
    return min(range(MIN_VISION_LAYERS, REAL_VISION_LAYERS + 1), key=lambda v: abs(math.log(
        vision_llm_ratio(text_tokens, num_visual, views, served_text, REAL_VISION, v) / real)))


def cut_deepstack_indexes(depth: int, indexes: list[int] | None = None, real_depth: int = REAL_VISION_LAYERS
                          ) -> list[int]:
    """The DeepStack taps of a ``depth``-block tower: each real tap (block ``i`` of ``real_depth``) at the same
    relative depth, ``round((i + 1) x depth / real_depth) - 1``, pushed apart so that every level keeps its own
    block (distinct, increasing, within the tower). [8, 16, 24] of 27 -> [0, 1, 2] of 3, [0, 2, 3] of 4, [2, 5, 7]
    of 9."""
    indexes = list(REAL_VISION["deepstack_visual_indexes"] if indexes is None else indexes)
    if depth < len(indexes):
        raise ValueError(f"a {depth}-block tower cannot keep {len(indexes)} DeepStack levels")
    cut = [min(depth - 1, max(0, round((i + 1) * depth / real_depth) - 1)) for i in indexes]
    for level in range(1, len(cut)):  # distinct and increasing
        cut[level] = max(cut[level], cut[level - 1] + 1)
    for level in range(len(cut) - 1, -1, -1):  # within the tower, leaving room for the levels above
        cut[level] = min(cut[level], depth - len(cut) + level)
    return cut


def eight_b_configs(llm_layers: int, vision_layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(text_config, vision_config)`` of the depth-cut model: Qwen3-8B's and the ViT's widths, ``llm_layers``
    LLM layers, ``vision_layers`` ViT blocks with the DeepStack taps cut to them."""
    if vision_layers < MIN_VISION_LAYERS:
        raise ValueError(f"the tower needs at least {MIN_VISION_LAYERS} blocks (one per DeepStack level)")
    text = {k: REAL_TEXT[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads", "head_dim")}
    text["num_hidden_layers"] = llm_layers
    vision = {k: REAL_VISION[k] for k in ("hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                                          "num_position_embeddings")}
    vision.update(depth=vision_layers, deepstack_visual_indexes=cut_deepstack_indexes(vision_layers))
    return text, vision


def build_config(vocab_size: int, text: dict[str, Any], vision: dict[str, Any], *, dtype: str = "float32",
                 mrope_section: list[int] | None = None):
    """A ``Qwen3VLConfig`` with the given text / vision fields over Qwen3-VL's fixed ones (patching, activations,
    interleaved M-RoPE, the tiny tokenizer's special-token ids)."""
    from transformers import Qwen3VLConfig

    from textscythe_dev.tiny_common import ENDOFTEXT, IM_END
    from textscythe_dev.tiny_qwen import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
    from textscythe_dev.tiny_qwen3_vl import vocabulary

    vocab = vocabulary()
    text_config = dict(
        vocab_size=vocab_size, hidden_act="silu", max_position_embeddings=MAX_POSITION_EMBEDDINGS, rms_norm_eps=1e-6,
        attention_bias=False, bos_token_id=vocab[ENDOFTEXT], eos_token_id=vocab[IM_END],
        pad_token_id=vocab[ENDOFTEXT], tie_word_embeddings=False, dtype=dtype,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                         "mrope_section": list(mrope_section or MROPE_SECTION), "mrope_interleaved": True},
        **text,
    )
    vision_config = dict(
        hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=REAL_VISION["patch_size"],
        spatial_merge_size=REAL_VISION["spatial_merge_size"], temporal_patch_size=REAL_VISION["temporal_patch_size"],
        initializer_range=0.02, dtype=dtype, **vision,
    )
    config = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
        image_token_id=vocab[IMAGE_PAD], video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START], vision_end_token_id=vocab[VISION_END],
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    config.dtype = dtype
    return config


def build_processor(tokenizer):
    """``Qwen3VLProcessor`` whose image processor allows the benchmark's 1024 x 1024 image and nothing larger."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from textscythe_dev.tiny_qwen3_vl import CHAT_TEMPLATE

    common = dict(patch_size=REAL_VISION["patch_size"], temporal_patch_size=REAL_VISION["temporal_patch_size"],
                  merge_size=REAL_VISION["spatial_merge_size"], image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, **common)
    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": 4 * MAX_PIXELS},
                                            fps=2, min_frames=2, max_frames=8, cap_pixels_per_frame=False, **common)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=CHAT_TEMPLATE)


def build_checkpoint(directory: Path, text: dict[str, Any], vision: dict[str, Any], *, dtype: str = "float32",
                     mrope_section: list[int] | None = None) -> Path:
    """Write a Qwen3-VL checkpoint (config, tokenizer, processor; no weights: serve with ``--load-format dummy``)."""
    from textscythe_dev.tiny_qwen3_vl import build_tiny_qwen3_vl_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_qwen3_vl_tokenizer()
    config = build_config(len(tokenizer), text, vision, dtype=dtype, mrope_section=mrope_section)
    for stale in directory.glob("*.safetensors"):
        stale.unlink()
    config.save_pretrained(directory)
    build_processor(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(directory / "textscythe_tiny_model.json", "w") as f:
        json.dump({"kind": "qwen3-vl", "with_weights": False, "dtype": dtype, "text_config": text,
                   "vision_config": vision}, f, indent=2)
    return directory


def build_eight_b_shaped(directory: Path, llm_layers: int, text_tokens: int, vision_layers: int | None = None,
                         dtype: str = "float32") -> Path:
    """A Qwen3-VL-8B-shaped checkpoint with ``llm_layers`` LLM layers and (unless given) the ViT depth that keeps
    the real vision:LLM FLOP ratio for a ``text_tokens``-token question about one 1024 x 1024 image."""
    if vision_layers is None:
        vision_layers = derive_vision_layers(llm_layers, text_tokens, visual_tokens(REAL_VISION))
    text, vision = eight_b_configs(llm_layers, vision_layers)
    return build_checkpoint(directory, text, vision, dtype=dtype)


def build_tiny_shaped(directory: Path, llm_layers: int = 2, dtype: str = "float32") -> Path:
    """The ``--quick`` checkpoint: Qwen3-VL's structure (DeepStack included) at tiny widths, the same processor."""
    return build_checkpoint(directory, {**TINY_TEXT, "num_hidden_layers": llm_layers}, dict(TINY_VISION),
                            dtype=dtype, mrope_section=TINY_MROPE_SECTION)
