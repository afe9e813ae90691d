"""What the tiny checkpoint builders share (:mod:`~textscythe_dev.tiny_models`, :mod:`~textscythe_dev.tiny_qwen`,
:mod:`~textscythe_dev.tiny_qwen3_vl`, :mod:`~textscythe_dev.tiny_gemma4`, :mod:`~textscythe_dev.tiny_onevision`,
:mod:`~textscythe_dev.tiny_internvl`): the tiny tower and LLM sizes, the ChatML (Qwen-style) special tokens and
tokenizer, helpers that make random weights useful for tests, and the steps that write a checkpoint directory.

Each family module keeps what is its own: its special-token table, chat template, config fields, processor and
attention sharpening.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from textscythe_dev.word_tokenizer import build_word_tokenizer

UNK_TOKEN = "<unk>"
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The ChatML families' token tables start with these, so the ids agree across them: <unk>=0, <|endoftext|>=1,
# <|im_start|>=2, <|im_end|>=3.
CHATML_SPECIAL_TOKENS = (UNK_TOKEN, ENDOFTEXT, IM_START, IM_END)

# Tiny but real shapes: every LLM has 2 layers of width 128 with 2 heads (of 64 where the config sets head_dim:
# vLLM's CPU attention supports head sizes 32, 64, 80, ...), every ViT-style tower 2 layers of width 64.
TEXT_SIZES: dict[str, int] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
)
# Key order shows in InternVL's chat-format config.json, which is written from a plain dict.
VISION_SIZES: dict[str, int] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)

WEIGHTS_INDEX = "model.safetensors.index.json"
MARKER_FILE = "textscythe_tiny_model.json"


def build_chatml_tokenizer(
    special_tokens: Sequence[str], *, chat_template: str, extra_special_tokens: Sequence[str] | Mapping[str, str],
    model_max_length: int,
):
    """A word-level tokenizer (:func:`~textscythe_dev.word_tokenizer.build_word_tokenizer`) with Qwen's turn
    conventions: ``<|im_end|>`` ends a generation, ``<|endoftext|>`` pads, and no BOS token is prepended."""
    return build_word_tokenizer(
        special_tokens,
        chat_template=chat_template,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=extra_special_tokens,
        model_max_length=model_max_length,
    )


def chatml_text_token_ids(vocab: Mapping[str, int]) -> dict[str, int]:
    """The BOS / EOS / pad ids of a Qwen-style LLM config, as Qwen's own checkpoints set them."""
    return dict(bos_token_id=vocab[ENDOFTEXT], eos_token_id=vocab[IM_END], pad_token_id=vocab[ENDOFTEXT])


def scene_video(seed: int, num_frames: int, width: int, height: int, fps: float):
    """``(frames [T, H, W, 3] uint8, metadata)``: a deterministic clip of :func:`~textscythe_dev.images.scene`
    pictures (a new scene every frame), in the ``(video, metadata)`` form vLLM's video parsers expect."""
    import numpy as np

    from textscythe_dev.images import scene

    frames = np.stack([np.asarray(scene(seed * 1000 + index, width, height)) for index in range(num_frames)])
    metadata = {
        "fps": fps, "duration": num_frames / fps, "total_num_frames": num_frames,
        "frames_indices": list(range(num_frames)), "video_backend": "opencv", "do_sample_frames": False,
    }
    return frames, metadata


def scale_projections(projections: Iterable[Any], scale: float) -> None:
    """Multiply linear layers' weights (and biases) by ``scale`` in place.

    Applied to the query and key projections of random weights, it multiplies every attention logit by
    ``scale**2``: with the default initialisation (std 0.02) a tiny random model attends almost uniformly, so its
    output would barely depend on positions or on which tokens receive attention, and a test could not tell right
    positions from wrong ones.
    """
    import torch

    with torch.no_grad():
        for projection in projections:
            projection.weight.mul_(scale)
            if projection.bias is not None:
                projection.bias.mul_(scale)


def scale_fused_query_key(fused_qkv_layers: Iterable[Any], scale: float) -> None:
    """:func:`scale_projections` for fused ``qkv`` linear layers (rows: q, then k, then v): only q and k grow."""
    import torch

    with torch.no_grad():
        for qkv in fused_qkv_layers:
            width = qkv.out_features // 3
            qkv.weight[: 2 * width].mul_(scale)
            qkv.bias[: 2 * width].mul_(scale)


def seed_image_newline(model) -> None:
    """Draw a LLaVA-NeXT / OneVision ``image_newline`` from the seeded generator: some transformers versions leave
    it with ``torch.empty``-like values, which would make the weights differ from run to run."""
    import torch

    with torch.no_grad():
        model.model.image_newline.normal_(0.0, model.config.text_config.hidden_size**-0.5)


def vllm_weight_name(name: str) -> str:
    """Map a key written by transformers 5's ``save_pretrained`` to the name vLLM 0.32's LLaVA loader expects.

    transformers 5 saves LLaVA in the legacy top-level layout (``language_model.model.*``,
    ``language_model.lm_head.*``, ``multi_modal_projector.*``, ``image_newline``), which vLLM maps
    itself, but it writes the CLIP tower without its ``vision_model.`` level
    (``vision_tower.embeddings.*``). vLLM's ``CLIPVisionModel`` lives under ``vision_tower.vision_model``,
    and transformers accepts that layout too (it strips ``vision_model.`` when loading), so we restore it.
    """
    prefix = "vision_tower."
    if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + name[len(prefix) :]
    return name


def restore_vision_model_prefix(path: Path) -> None:
    """Rewrite the single ``*.safetensors`` file that ``save_pretrained`` wrote in ``path`` with the tower keys
    vLLM expects (:func:`vllm_weight_name`)."""
    from safetensors.torch import load_file, save_file

    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(
            f"expected exactly one safetensors file in {path}, found {[f.name for f in files]}"
        )
    tensors = load_file(files[0])
    renamed = {vllm_weight_name(k): v.contiguous() for k, v in tensors.items()}
    if len(renamed) != len(tensors):
        raise RuntimeError("weight renaming produced duplicate names")
    save_file(renamed, files[0], metadata={"format": "pt"})
    files[0].chmod(0o644)


def prepare_directory(path: str | Path) -> Path:
    """Create ``path`` if needed and delete weights left by an earlier build, so that a checkpoint built without
    weights is never served with stale ones."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.safetensors"):
        stale.unlink()
    (path / WEIGHTS_INDEX).unlink(missing_ok=True)
    return path


def seeded_model(config, seed: int):
    """The transformers model named by ``config.architectures[0]``, in eval mode, with weights drawn after
    ``torch.manual_seed(seed)``."""
    import torch
    import transformers

    model_class = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    return model_class(config).eval()


def save_weights(model, path: Path) -> None:
    # One shard: the tiny models are far below the limit, and the fix-ups after saving expect one file.
    model.save_pretrained(path, safe_serialization=True, max_shard_size="10GB")


def write_marker(path: Path, kind: str, *, with_weights: bool, seed: int, dtype: str, **extra: Any) -> None:
    """Record how the checkpoint was built (``textscythe_tiny_model.json``)."""
    with open(path / MARKER_FILE, "w") as f:
        json.dump({"kind": kind, "with_weights": with_weights, "seed": seed, "dtype": dtype, **extra}, f, indent=2)


def write_checkpoint(
    path: str | Path,
    *,
    kind: str,
    config,
    tokenizer,
    processor,
    with_weights: bool,
    seed: int,
    dtype: str,
    adjust_weights: Callable[[Any], None] | None = None,
    rewrite_saved_weights: Callable[[Path], None] | None = None,
    marker_fields: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory the way every tiny builder does, and return its path.

    With ``with_weights``: random weights from :func:`seeded_model`, changed in place by ``adjust_weights`` (e.g.
    sharpened attention) before saving, and the saved file then rewritten by ``rewrite_saved_weights`` (for key
    names or layouts vLLM expects); without: ``config.json`` only. Then the processor, the tokenizer (vLLM and
    transformers both look for the chat template next to it too) and the build record, with ``marker_fields``
    added to it.
    """
    path = prepare_directory(path)
    if with_weights:
        model = seeded_model(config, seed)
        if adjust_weights is not None:
            adjust_weights(model)
        save_weights(model, path)
        if rewrite_saved_weights is not None:
            rewrite_saved_weights(path)
    else:
        config.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_marker(path, kind, with_weights=with_weights, seed=seed, dtype=dtype, **(marker_fields or {}))
    return path


def builder_argument_parser(module: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command line every builder module takes (``python -m textscythe_dev.MODULE PATH [--with-weights]
    [--seed N]``); the module adds its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m textscythe_dev.{module}", description=description)
    parser.add_argument("path", type=Path)
    parser.add_argument("--with-weights", action="store_true", help="also save random (seeded) weights")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def serve_command(path: Path, *, with_weights: bool, flags: str = "") -> str:
    """How to serve a tiny checkpoint on CPU: without saved weights vLLM must make random ones."""
    load = "" if with_weights else " --load-format dummy"
    return f"vllm serve {path}{load}{flags} --enforce-eager"
