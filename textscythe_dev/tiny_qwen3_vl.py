"""Tiny Qwen3-VL (dense and MoE) and Qwen3.5-shaped checkpoints, built locally, for offline tests.

The checkpoints keep the structure that matters for visual-token pruning in the Qwen3-VL family -- 16 px patches,
2x2 patch merging, 2-frame temporal patches, learned (interpolated) position embeddings plus 2-D rotary in the ViT,
DeepStack (``deepstack_visual_indexes``: features of some ViT blocks are merged and *added* to the hidden states of
the first LLM layers at the visual positions), interleaved M-RoPE in the LLM and the timestamped video prompt
(``<0.5 seconds><|vision_start|><|video_pad|>...<|vision_end|>`` per 2-frame step) -- at a tiny width and depth:

* vision tower: 4 blocks, width 64, 2 heads, DeepStack taps after blocks 1 and 2, 576 learned position embeddings;
* LLM: 2 layers, width 128, 2 heads of 64 (vLLM's CPU attention needs head_dim in {32, 64, ...}), interleaved
  ``mrope_section`` [12, 10, 10]; with ``moe=True`` both layers are sparse MoE blocks (4 experts, top 2);
* Qwen3.5 (:func:`build_tiny_qwen3_5`): the same tower without DeepStack, and a hybrid LLM -- one Gated-DeltaNet
  (linear attention) layer with 128-wide heads, then one gated full-attention layer with partial rotary (0.25) --
  as in Qwen3.5. vLLM's CPU Gated-DeltaNet kernel needs head_k_dim 128 and bfloat16: serve it with
  ``--dtype bfloat16`` (``--dtype float32`` dies at the first request: "CPU GDN attention requires BF16.").

Images are resized to at most 384 x 384 px (24 x 24 patches = 144 visual tokens); each video is resized so that all
its frames together hold at most 16 x 384 x 384 px. The video processor samples 2 frames per second (at least 2),
as Qwen3-VL's does.

``with_weights=False`` writes config, tokenizer and processor only (serve with ``--load-format dummy``);
``with_weights=True`` also saves random, seeded float32 weights that transformers and vLLM both load, with
sharpened attention (:func:`sharpen_attention`) and ``rope_theta`` 10,000 so that outputs depend clearly on
positions. Nothing is downloaded.

The tokenizer is the word-level vocabulary of :mod:`textscythe_dev.word_tokenizer` plus Qwen's special tokens (the
same ids as :mod:`textscythe_dev.tiny_qwen`) and a few extra words for the video timestamps (``<``, ``>``,
``seconds``). Qwen3.5 gets a byte-level BPE over the same words instead (:func:`build_tiny_qwen3_5_tokenizer`:
transformers forces ``Qwen3_5Tokenizer`` on ``qwen3_5`` checkpoints), with the same special-token ids. The chat
template renders the Qwen3-VL format (ChatML, system messages as given, no default system prompt)::

    <|im_start|>user
    <|vision_start|><|image_pad|><|vision_end|>what is this ?<|im_end|>
    <|im_start|>assistant

Command line::

    python -m textscythe_dev.tiny_qwen3_vl PATH [--moe | --qwen3-5] [--with-weights] [--seed N]
"""

from __future__ import annotations

import json
from pathlib import Path

from textscythe_dev.tiny_common import (
    ENDOFTEXT,
    IM_END,
    TEXT_SIZES,
    build_chatml_tokenizer,
    builder_argument_parser,
    chatml_text_token_ids,
    scale_fused_query_key,
    serve_command,
    write_checkpoint,
)
from textscythe_dev.tiny_qwen import (
    IMAGE_PAD,
    QWEN_CONTROL_TOKENS,
    SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from textscythe_dev.word_tokenizer import im_chat_template, word_vocabulary

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # resized sides are multiples of 32 px
# Pixel bounds of one image after the processor's resize.
MIN_PIXELS = 64 * 64
MAX_PIXELS = 384 * 384  # at most 24 x 24 patches = 144 visual tokens per image
# Qwen3-VL's video bounds cover all frames together (t x h x w), not one frame.
VIDEO_MIN_PIXELS = 64 * 64
VIDEO_MAX_PIXELS = 16 * 384 * 384
VIDEO_FPS = 2  # frames sampled per second of video
MAX_POSITION_EMBEDDINGS = 8192
DEEPSTACK_VISUAL_INDEXES = [1, 2]
# Words the Qwen3-VL video prompt needs (``<0.5 seconds>``), after the word vocabulary (not special tokens).
TIMESTAMP_WORDS = ("<", ">", "seconds")

CHAT_TEMPLATE = im_chat_template(VISION_START + IMAGE_PAD + VISION_END, VISION_START + VIDEO_PAD + VISION_END)


def vocabulary() -> dict[str, int]:
    vocab = word_vocabulary(SPECIAL_TOKENS)
    for word in TIMESTAMP_WORDS:
        vocab.setdefault(word, len(vocab))
    return vocab


def build_tiny_qwen3_vl_tokenizer():
    """A ``PreTrainedTokenizerFast`` with Qwen's special tokens and chat format (word-level, lower-cased), which
    also spells the video timestamps ``<1.5 seconds>`` with known words."""
    from tokenizers.models import WordLevel

    tokenizer = build_chatml_tokenizer(
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens=list(QWEN_CONTROL_TOKENS),
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    # Extend the word-level model in place with the timestamp words (ordinary tokens: normalised, split by the
    # pre-tokenizer like every other word), keeping every existing id.
    backend = tokenizer.backend_tokenizer
    backend.model = WordLevel(vocab=vocabulary(), unk_token=SPECIAL_TOKENS[0])
    assert tokenizer.convert_tokens_to_ids("seconds") == vocabulary()["seconds"]
    assert tokenizer.convert_tokens_to_ids(IMAGE_PAD) == vocabulary()[IMAGE_PAD]
    return tokenizer


def build_tiny_qwen3_5_tokenizer():
    """A byte-level BPE ``Qwen3_5Tokenizer`` over the same words, with Qwen's special tokens at the same ids.

    transformers always loads a ``qwen3_5`` checkpoint's tokenizer as ``Qwen3_5Tokenizer`` (a byte-level BPE with
    Qwen's pre-tokenizer regex, rebuilt from ``vocab`` and ``merges``; ``tokenizer_class`` in the checkpoint is
    overridden), so the word-level tokenizer cannot be used there. This one is a BPE trained (deterministically,
    offline) until every word -- with and without a leading space -- is one token; other text falls back to
    byte tokens, so nothing is unknown. It is not lower-cased.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer

    from textscythe_dev.word_tokenizer import DIGITS, PUNCTUATION, WORDS

    trainee = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    trainee.normalizer = normalizers.NFC()
    trainee.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words = ["user", "assistant", "system", "seconds", *WORDS, *PUNCTUATION, *DIGITS]
    corpus = [*words, *(" " + word for word in words), "\n", "\n\n", " \n"]
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    trainee.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(trainee.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    tokenizer = Qwen3_5Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, eos_token=IM_END, pad_token=ENDOFTEXT,
        extra_special_tokens=list(QWEN_CONTROL_TOKENS),
        model_max_length=MAX_POSITION_EMBEDDINGS, chat_template=CHAT_TEMPLATE,
    )
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == index, token
    return tokenizer


def _vision_config(dtype: str, deepstack: bool) -> dict:
    config = dict(
        depth=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=128,
        hidden_act="gelu_pytorch_tanh",
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        num_position_embeddings=576,  # a 24 x 24 grid of learned positions, interpolated to each image's grid
        initializer_range=0.02,
        dtype=dtype,
    )
    if deepstack:
        config["deepstack_visual_indexes"] = list(DEEPSTACK_VISUAL_INDEXES)
    return config


def _text_common(vocab_size: int, dtype: str) -> dict:
    vocab = vocabulary()
    return dict(
        vocab_size=vocab_size,
        **TEXT_SIZES,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        attention_bias=False,
        **chatml_text_token_ids(vocab),
        tie_word_embeddings=False,
        dtype=dtype,
    )


def _token_ids() -> dict:
    vocab = vocabulary()
    return dict(
        image_token_id=vocab[IMAGE_PAD],
        video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START],
        vision_end_token_id=vocab[VISION_END],
    )


def build_config(vocab_size: int, *, moe: bool = False, dtype: str = "float32"):
    """``Qwen3VLConfig`` (or ``Qwen3VLMoeConfig`` with ``moe``) of the tiny shape described in the module doc."""
    text_config = _text_common(vocab_size, dtype)
    # Qwen3-VL: interleaved M-RoPE over the 32 rotary frequency pairs of a 64-wide head (T, H, W = 12, 10, 10;
    # Qwen3-VL's own is [24, 20, 20] for 128-wide heads).
    text_config["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [12, 10, 10], "mrope_interleaved": True,
    }
    if moe:
        from transformers import Qwen3VLMoeConfig as Config

        text_config.update(
            # moe_intermediate_size 48: 2 x 48 != 128, so the fused expert tensors' layout is unambiguous
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
            mlp_only_layers=[], norm_topk_prob=True,
        )
        architecture = "Qwen3VLMoeForConditionalGeneration"
    else:
        from transformers import Qwen3VLConfig as Config

        architecture = "Qwen3VLForConditionalGeneration"
    config = Config(
        text_config=text_config, vision_config=_vision_config(dtype, deepstack=True), tie_word_embeddings=False,
        **_token_ids(),
    )
    config.architectures = [architecture]
    config.dtype = dtype
    return config


def build_qwen3_5_config(vocab_size: int, dtype: str = "float32"):
    """``Qwen3_5Config``: a tiny hybrid LLM (Gated DeltaNet layer, then gated full attention) and a ViT without
    DeepStack."""
    from transformers import Qwen3_5Config

    text_config = _text_common(vocab_size, dtype)
    text_config.update(
        layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        # vLLM's CPU Gated-DeltaNet kernel (chunk_gated_delta_rule_cpu) rejects head_k_dim 32 ("Unexpected head dim
        # size, 32"); 128 is Qwen3.5's own. One key head, two value heads (Qwen3.5 also has more value heads).
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_num_key_heads=1,
        linear_num_value_heads=2,
        # Qwen3.5 rotates a quarter of each head: 16 of 64 dims = 8 frequency pairs, T/H/W interleaved 3/3/2
        # (Qwen3.5's own is [11, 11, 10] for 256-wide heads).
        rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2], "mrope_interleaved": True,
        },
    )
    config = Qwen3_5Config(
        text_config=text_config, vision_config=_vision_config(dtype, deepstack=False), tie_word_embeddings=False,
        **_token_ids(),
    )
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    config.dtype = dtype
    return config


def build_processor(tokenizer):
    """``Qwen3VLProcessor`` with Qwen3-VL's image processor (16 px patches) and timestamped video processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    common = dict(
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, **common)
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}, fps=VIDEO_FPS,
        min_frames=2, max_frames=32, cap_pixels_per_frame=False, **common,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def sharpen_attention(model, text_scale: float = 4.0, vision_scale: float = 4.0) -> None:
    """Make the attention of random weights far from uniform (see :func:`textscythe_dev.tiny_qwen.sharpen_attention`).

    The LLM normalises q and k per head (``q_norm``/``k_norm``), so scaling the projections would be undone: the
    norms' gains are scaled instead (Qwen3.5's norms compute ``x * (1 + weight)``: its gain ``1 + weight`` is
    scaled). The ViT's fused ``qkv`` rows (q, then k, then v) are scaled as in Qwen2.5-VL.
    """
    import torch

    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attention = getattr(layer, "self_attn", None)
            if attention is None:  # a Qwen3.5 linear-attention layer
                continue
            for norm in (attention.q_norm, attention.k_norm):
                if type(norm).__name__.startswith("Qwen3_5"):
                    norm.weight.copy_((1.0 + norm.weight) * text_scale - 1.0)
                else:
                    norm.weight.mul_(text_scale)
    scale_fused_query_key((block.attn.qkv for block in model.model.visual.blocks), vision_scale)


def _save_experts_in_hub_layout(path: Path) -> None:
    """Rewrite the fused MoE expert tensors of ``path``'s ``model.safetensors`` in the layout of the published
    Qwen3-VL-MoE checkpoints.

    transformers 5 keeps ``experts.gate_up_proj`` as [experts, 2 x intermediate, hidden] and ``experts.down_proj`` as
    [experts, hidden, intermediate] and saves them so; the Hub checkpoints store [experts, hidden, 2 x intermediate]
    and [experts, intermediate, hidden]. transformers transposes those on load (``conversion_mapping``:
    ``Transpose(1, 2, check_dims=True)``) and vLLM's Qwen3-VL-MoE loader expects them
    (``is_fused_checkpoint_transposed=True``): without this, vLLM fails to load the file (a shape mismatch).
    """
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    for name in tensors:
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


def build_tiny_qwen3_vl(
    path: str | Path, *, moe: bool = False, with_weights: bool = False, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a tiny Qwen3-VL (``moe``: Qwen3-VL-MoE) checkpoint directory to ``path`` and return it."""
    tokenizer = build_tiny_qwen3_vl_tokenizer()
    return write_checkpoint(
        path, kind="qwen3-vl-moe" if moe else "qwen3-vl", config=build_config(len(tokenizer), moe=moe, dtype=dtype),
        tokenizer=tokenizer, processor=build_processor(tokenizer), with_weights=with_weights, seed=seed, dtype=dtype,
        adjust_weights=sharpen_attention,
        rewrite_saved_weights=_save_experts_in_hub_layout if moe else None,
    )


def build_tiny_qwen3_5(path: str | Path, *, with_weights: bool = False, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a tiny Qwen3.5 (hybrid Gated-DeltaNet LLM) checkpoint directory to ``path`` and return it."""
    tokenizer = build_tiny_qwen3_5_tokenizer()
    return write_checkpoint(
        path, kind="qwen3.5", config=build_qwen3_5_config(len(tokenizer), dtype), tokenizer=tokenizer,
        processor=build_processor(tokenizer), with_weights=with_weights, seed=seed, dtype=dtype,
        adjust_weights=sharpen_attention,
    )


def main(argv: list[str] | None = None) -> int:
    parser = builder_argument_parser("tiny_qwen3_vl")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--moe", action="store_true", help="Qwen3-VL-MoE instead of dense Qwen3-VL")
    family.add_argument("--qwen3-5", action="store_true", help="Qwen3.5 (hybrid linear-attention LLM)")
    args = parser.parse_args(argv)
    if args.qwen3_5:
        out = build_tiny_qwen3_5(args.path, with_weights=args.with_weights, seed=args.seed)
        name = "Qwen3.5"
    else:
        out = build_tiny_qwen3_vl(args.path, moe=args.moe, with_weights=args.with_weights, seed=args.seed)
        name = "Qwen3-VL-MoE" if args.moe else "Qwen3-VL"
    # vLLM's CPU Gated-DeltaNet kernel runs in bfloat16 only
    flags = " --dtype bfloat16" if args.qwen3_5 else ""
    print(f"wrote tiny {name} to {out} (serve: {serve_command(out, with_weights=args.with_weights, flags=flags)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
