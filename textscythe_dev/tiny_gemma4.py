"""Tiny Gemma 4 vision-language checkpoints, built locally, that vLLM serves on CPU.

The checkpoint has the structure that matters for visual-token pruning in Gemma 4 (vLLM's
``Gemma4ForConditionalGeneration``, ``vllm/model_executor/models/gemma4_mm.py``) at a tiny width and depth:

* vision tower (``Gemma4VisionModel``): 2 encoder layers, width 64, 2 heads of 32, 16 px patches, 2-D axial
  RoPE, learned (x, y) position table, and the 3 x 3 position-based average pooling of patches into soft
  tokens (``pooling_kernel_size`` 3); ``default_output_length`` (vLLM's per-image soft-token budget) 70;
* LLM: 2 Gemma 4 text layers (one ``sliding_attention``, one ``full_attention``), width 128, 2 query heads and
  1 KV head of 64 in both kinds of layer (``head_dim`` = ``global_head_dim`` = 64: vLLM's CPU attention needs
  head_dim in {32, 64, ...}; real checkpoints use 256 / 512), per-layer embeddings (PLE) of width 16 (as in the
  small E2B / E4B models), Gemma 4's two RoPE kinds (``default`` for sliding, ``proportional`` with
  ``partial_rotary_factor`` 0.25 for full attention), final-logit soft-capping 30, and causal attention over
  image tokens like the small models (``use_bidirectional_attention`` None). ``bidirectional_vision=True`` sets
  ``"vision"`` as in the large models (each image's tokens attend to each other in sliding layers), but vLLM's
  CPU attention backend silently ignores that mask, so on CPU vLLM and transformers then differ;
* no audio tower (``audio_config`` None), so vLLM serves images and video only.

Soft tokens: the processor resizes every image (aspect ratio kept) to at most ``max_soft_tokens * 9`` patches,
both sides multiples of 48 px; ``max_soft_tokens`` must be one of 70, 140, 280, 560, 1120 (Gemma 4's own
check). Images default to 70 here (e.g. 336 x 336 is resized to 384 x 384: 8 x 8 = 64 soft tokens; 480 x 336:
10 x 7 = 70); video frames always get 70 in vLLM (``_VIDEO_MAX_SOFT_TOKENS``), each frame preceded by an ``mm:ss`` timestamp.

``with_weights=False`` writes config, tokenizer and processor only (serve with ``--load-format dummy``);
``with_weights=True`` also saves random, seeded float32 weights (transformers' ``Gemma4ForConditionalGeneration``)
that both transformers and vLLM load, with sharpened attention (:func:`sharpen_attention`). Nothing is
downloaded.

The tokenizer is the word-level vocabulary of :mod:`textscythe_dev.word_tokenizer` plus Gemma 4's special
tokens (``<bos>``, ``<eos>``, ``<|turn>``, ``<turn|>``, ``<|image>``, ``<|image|>``, ``<image|>``, ``<|video|>``,
the audio trio the HF processor insists on, ...), and the chat template renders Gemma 4's turn format::

    <bos><|turn>user
    <|image|>what is this ?<turn|>
    <|turn>model

vLLM expands each ``<|image|>`` into ``<|image>`` + N x ``<|image|>`` + ``<image|>`` and each ``<|video|>``
into ``00:00 <|image>`` + N x ``<|video|>`` + ``<image|> 00:00 <|image>`` ... (one group per frame).

Command line::

    python -m textscythe_dev.tiny_gemma4 PATH [--with-weights] [--bidirectional-vision]
"""

from __future__ import annotations

from pathlib import Path

from textscythe_dev.tiny_common import (
    TEXT_SIZES,
    VISION_SIZES,
    builder_argument_parser,
    scene_video,
    serve_command,
    write_checkpoint,
)
from textscythe_dev.word_tokenizer import build_word_tokenizer, word_vocabulary

UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
TURN_START = "<|turn>"
TURN_END = "<turn|>"
BOI_TOKEN = "<|image>"
IMAGE_TOKEN = "<|image|>"
EOI_TOKEN = "<image|>"
VIDEO_TOKEN = "<|video|>"
BOA_TOKEN = "<|audio>"
AUDIO_TOKEN = "<|audio|>"
EOA_TOKEN = "<audio|>"
MODEL_ROLE = "model"  # Gemma's assistant role name (not in the word list)
# Order fixes the ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3 (Gemma's own ids: vLLM's Gemma 4 feeds token 0 -- not
# pad_token_id, as transformers does -- to the per-layer embeddings at image positions, so pad must be 0), then
# <|turn>=4, <turn|>=5, <|image>=6, <|image|>=7, <image|>=8, <|video|>=9, <|audio>=10, <|audio|>=11, <audio|>=12,
# model=13.
SPECIAL_TOKENS = (
    PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN, TURN_START, TURN_END, BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN,
    VIDEO_TOKEN, BOA_TOKEN, AUDIO_TOKEN, EOA_TOKEN, MODEL_ROLE,
)
# Named special tokens: the HF Gemma4Processor reads tokenizer.image_token / boi_token / eoi_token (and, through
# a precedence quirk in ``validate_inputs``, requires boa_token / eoa_token even without audio).
NAMED_SPECIAL_TOKENS = {
    "image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "video_token": VIDEO_TOKEN,
    "audio_token": AUDIO_TOKEN, "boa_token": BOA_TOKEN, "eoa_token": EOA_TOKEN,
    "sot_token": TURN_START, "eot_token": TURN_END,
}

PATCH_SIZE = 16
POOLING_KERNEL_SIZE = 3
IMAGE_MAX_SOFT_TOKENS = 70  # one of Gemma 4's (70, 140, 280, 560, 1120)
VIDEO_MAX_SOFT_TOKENS = 70  # fixed in vLLM (gemma4_mm._VIDEO_MAX_SOFT_TOKENS)
# x/y position-table rows: more than the longest patch row (max_soft_tokens 1120, a 48 px high strip: 3360 patches)
POSITION_EMBEDDING_SIZE = 4096
MAX_POSITION_EMBEDDINGS = 8192
HEAD_DIM = 64

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url', 'image_pil'] -%}"
    "{{- '<|image|>' -}}"
    "{%- elif part['type'] in ['video', 'video_url'] -%}"
    "{{- '<|video|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|turn>model\\n' -}}"
    "{%- endif -%}"
)


def vocabulary() -> dict[str, int]:
    return word_vocabulary(SPECIAL_TOKENS)


def build_tiny_gemma4_tokenizer():
    """A ``PreTrainedTokenizerFast`` with Gemma 4's special tokens and turn format (word-level, lower-cased)."""
    tokenizer = build_word_tokenizer(
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(NAMED_SPECIAL_TOKENS),
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    # ``bos_token`` only for the chat template (``{{ bos_token }}``): with ``bos_token=`` build_word_tokenizer would
    # also prepend it to every encoded text, and vLLM encodes Gemma 4 chat prompts with add_special_tokens=False.
    tokenizer.bos_token = BOS_TOKEN
    # build_word_tokenizer makes the first special token (<pad>, id 0) the unknown token: map unknown words to
    # <unk> (id 3) instead, as Gemma does.
    from tokenizers.models import WordLevel

    tokenizer.backend_tokenizer.model = WordLevel(vocab=vocabulary(), unk_token=UNK_TOKEN)
    tokenizer.unk_token = UNK_TOKEN
    assert tokenizer.convert_tokens_to_ids(PAD_TOKEN) == 0 and tokenizer("zzzz")["input_ids"] == [3]
    return tokenizer


def build_config(vocab_size: int, dtype: str = "float32", bidirectional_vision: bool = False):
    from transformers import Gemma4Config

    vocab = vocabulary()
    text_config = dict(
        vocab_size=vocab_size,
        **dict(TEXT_SIZES, num_key_value_heads=1),  # grouped-query attention, as in Gemma 4
        head_dim=HEAD_DIM,
        global_head_dim=HEAD_DIM,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=512,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 10_000.0},
        },
        final_logit_softcapping=30.0,
        use_bidirectional_attention="vision" if bidirectional_vision else None,
        vocab_size_per_layer_input=vocab_size,
        hidden_size_per_layer_input=16,
        attention_k_eq_v=False,
        num_kv_shared_layers=0,
        enable_moe_block=False,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[PAD_TOKEN],
        tie_word_embeddings=True,
        dtype=dtype,
    )
    vision_config = dict(
        **VISION_SIZES,
        num_key_value_heads=2,
        head_dim=32,
        patch_size=PATCH_SIZE,
        pooling_kernel_size=POOLING_KERNEL_SIZE,
        position_embedding_size=POSITION_EMBEDDING_SIZE,
        rope_parameters={"rope_type": "axial", "rope_theta": 100.0},
        standardize=False,
        dtype=dtype,
        # Not a Gemma4VisionConfig field in transformers 5.19, but real Gemma 4 configs carry it and vLLM reads it
        # as the per-image soft-token budget (gemma4_mm.py _compute_num_soft_tokens / get_mm_max_tokens_per_item).
        default_output_length=IMAGE_MAX_SOFT_TOKENS,
    )
    config = Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=None,
        boi_token_id=vocab[BOI_TOKEN],
        eoi_token_id=vocab[EOI_TOKEN],
        image_token_id=vocab[IMAGE_TOKEN],
        video_token_id=vocab[VIDEO_TOKEN],
        boa_token_id=vocab[BOA_TOKEN],
        eoa_token_index=vocab[EOA_TOKEN],
        audio_token_id=vocab[AUDIO_TOKEN],
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    config.dtype = dtype
    return config


def build_processor(tokenizer):
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    common = dict(patch_size=PATCH_SIZE, pooling_kernel_size=POOLING_KERNEL_SIZE)
    image_processor = Gemma4ImageProcessor(**common, max_soft_tokens=IMAGE_MAX_SOFT_TOKENS)
    video_processor = Gemma4VideoProcessor(**common, max_soft_tokens=VIDEO_MAX_SOFT_TOKENS, num_frames=32)
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=IMAGE_MAX_SOFT_TOKENS,
    )


def tiny_video(seed: int, num_frames: int = 4, width: int = 336, height: int = 240, fps: float = 1.0):
    """:func:`~textscythe_dev.tiny_common.scene_video` at a size that suits this model (a few frames, one per
    second)."""
    return scene_video(seed, num_frames, width, height, fps)


def sharpen_attention(
    model, text_scale: float = 4.0, vision_scale: float = 4.0, logit_scale: float = 40.0
) -> None:
    """Make the random model's attention (and its next-token distribution) far from uniform.

    Gemma 4 RMS-normalises queries and keys per head (``q_norm`` / ``k_norm``) and uses attention scale 1.0, so
    scaling the projections does nothing: scale the norms' weights instead (logits grow by ``scale**2``). Gemma 4's
    RMSNorm multiplies by ``weight`` (initialised to 1). With tied std-0.02 embeddings the output logits are tiny
    (every token ~ uniform, so greedy picks are decided by rounding noise): the final norm is scaled by
    ``logit_scale`` so logits spread over several units (below the soft-cap of 30).
    """
    import torch

    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(logit_scale)
        for layer in model.model.language_model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.mul_(text_scale)
        for layer in model.model.vision_tower.encoder.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.mul_(vision_scale)


def build_tiny_gemma4(
    path: str | Path, *, with_weights: bool = False, seed: int = 0, dtype: str = "float32",
    bidirectional_vision: bool = False,
) -> Path:
    """Write a tiny Gemma 4 checkpoint directory to ``path`` and return it."""
    tokenizer = build_tiny_gemma4_tokenizer()
    return write_checkpoint(
        path, kind="gemma4", config=build_config(len(tokenizer), dtype, bidirectional_vision), tokenizer=tokenizer,
        processor=build_processor(tokenizer), with_weights=with_weights, seed=seed, dtype=dtype,
        adjust_weights=sharpen_attention, marker_fields={"bidirectional_vision": bidirectional_vision},
    )


def main(argv: list[str] | None = None) -> int:
    parser = builder_argument_parser("tiny_gemma4")
    parser.add_argument("--bidirectional-vision", action="store_true",
                        help='use_bidirectional_attention="vision" (as in the large Gemma 4 models)')
    args = parser.parse_args(argv)
    out = build_tiny_gemma4(args.path, with_weights=args.with_weights, seed=args.seed,
                            bidirectional_vision=args.bidirectional_vision)
    print(f"wrote tiny Gemma 4 to {out} (serve: {serve_command(out, with_weights=args.with_weights)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
