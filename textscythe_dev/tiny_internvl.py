"""Tiny InternVL-shaped checkpoints, built locally, that vLLM serves on CPU -- in both formats vLLM serves.

* ``fmt="hf"``: the transformers format (``InternVLForConditionalGeneration``, ``model_type`` ``internvl``, as in
  ``OpenGVLab/InternVL3-1B-hf``); vLLM serves it with ``interns1.py:InternS1ForConditionalGeneration`` and the
  transformers ``InternVLProcessor`` (``GotOcr2ImageProcessor`` with ``crop_to_patches``,
  ``InternVLVideoProcessor``). Image placeholder ``<IMG_CONTEXT>``, video placeholder ``<video>``.
* ``fmt="chat"``: the original format (``InternVLChatModel``, ``model_type`` ``internvl_chat``, as in
  ``OpenGVLab/InternVL2_5-1B``); vLLM serves it with ``internvl.py:InternVLChatModel`` and its own processor
  (``vllm/transformers_utils/processors/internvl.py``). vLLM ships no config class for ``internvl_chat``, so the
  checkpoint carries its own ``configuration_internvl_chat.py`` / ``configuration_intern_vit.py`` (``auto_map``):
  serve with ``--trust-remote-code`` (the code is loaded from the local directory; nothing is downloaded).
  Image placeholder ``<image>``, video placeholder ``<video>`` (frames filled with ``<|video_pad|>``, which vLLM
  enables only for a Qwen2/Qwen3 LLM whose vocabulary has that token).

Both keep what matters for visual-token pruning in InternVL 2.5/3 -- an InternViT tower with a [CLS] token
(dropped before the projector), 14 px patches, pixel shuffle with ``downsample_ratio`` 0.5 (2x2 patches -> 1
token, ``ps_version`` v2), dynamic tiling (1..``MAX_DYNAMIC_PATCH`` tiles on the closest aspect-ratio grid) plus a
global thumbnail tile last, one contiguous ``<img>`` + ``<IMG_CONTEXT>`` * (tiles * 16) + ``</img>`` run per image,
videos as one 112 px tile per frame (``Frame{i}: <img>...</img>``), and a Qwen2 LLM with 1-D RoPE -- at a tiny
size: 112 px tiles (8 x 8 = 64 patches -> 16 tokens per tile, at most 7 tiles = 112 tokens per image), a tower of
2 layers of width 64 (2 heads of 32), an LLM of 2 layers of width 128 (2 heads of 64, for vLLM's CPU attention).

``with_weights=False`` writes config, tokenizer and processor only (serve with ``--load-format dummy``);
``with_weights=True`` also saves random, seeded float32 weights with sharpened attention (as in
:mod:`textscythe_dev.tiny_qwen`). Both formats built with the same seed hold the *same* weights: the chat
format's are the HF format's renamed (:func:`chat_weight_name`, q/k/v fused into ``qkv``), so transformers'
``InternVLForConditionalGeneration`` on the HF-format directory is a reference for either. Nothing is downloaded.

The tokenizer is the word-level vocabulary of :mod:`textscythe_dev.word_tokenizer` with one set of special tokens
for both formats (same ids), and a ChatML chat template (no default system prompt)::

    <|im_start|>user
    <IMG_CONTEXT>what is this ?<|im_end|>        (fmt="hf";   fmt="chat" renders <image>)
    <|im_start|>assistant

Command line::

    python -m textscythe_dev.tiny_internvl PATH [--fmt hf|chat] [--with-weights]
"""

from __future__ import annotations

import json
from pathlib import Path

from textscythe_dev.tiny_common import (
    CHATML_SPECIAL_TOKENS,
    ENDOFTEXT,
    IM_END,
    TEXT_SIZES,
    VISION_SIZES,
    build_chatml_tokenizer,
    builder_argument_parser,
    chatml_text_token_ids,
    prepare_directory,
    scale_projections,
    seeded_model,
    serve_command,
    write_checkpoint,
    write_marker,
)
from textscythe_dev.word_tokenizer import im_chat_template, word_vocabulary

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"  # video placeholder of both formats; HF format also fills video frames with it
IMAGE_TOKEN = "<image>"  # image placeholder of the chat format
VIDEO_PAD = "<|video_pad|>"  # chat format: context token of video frames (vLLM: InternVLProcessingInfo.ctx_video_token)
# Order fixes the ids: <unk>=0, <|endoftext|>=1, <|im_start|>=2, <|im_end|>=3, <img>=4, </img>=5,
# <IMG_CONTEXT>=6, <video>=7, <image>=8, <|video_pad|>=9.
SPECIAL_TOKENS = (*CHATML_SPECIAL_TOKENS, IMG_START, IMG_END, IMG_CONTEXT, VIDEO_TOKEN, IMAGE_TOKEN, VIDEO_PAD)

FORMATS = ("hf", "chat")
IMAGE_SIZE = 112  # tile side in pixels
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5
PATCHES_PER_SIDE = IMAGE_SIZE // PATCH_SIZE  # 8
TOKENS_PER_TILE = int(PATCHES_PER_SIDE**2 * DOWNSAMPLE_RATIO**2)  # 16
MIN_DYNAMIC_PATCH = 1
MAX_DYNAMIC_PATCH = 6  # tiles, not counting the thumbnail (added whenever there is more than one tile)
MAX_POSITION_EMBEDDINGS = 8192
# ImageNet statistics: vLLM's chat-format processor hard-codes them, the HF-format processor reads its config.
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]

CHAT_TEMPLATES = {"hf": im_chat_template(IMG_CONTEXT, VIDEO_TOKEN), "chat": im_chat_template(IMAGE_TOKEN, VIDEO_TOKEN)}


def vocabulary() -> dict[str, int]:
    return word_vocabulary(SPECIAL_TOKENS)


def build_tokenizer(fmt: str = "hf"):
    """A ``PreTrainedTokenizerFast`` with InternVL's special tokens (named as transformers' ``InternVLProcessor``
    expects: ``start_image_token``, ``end_image_token``, ``context_image_token``, ``video_token``) and the
    format's chat template."""
    return build_chatml_tokenizer(
        SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATES[fmt],
        extra_special_tokens={
            "start_image_token": IMG_START, "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT, "video_token": VIDEO_TOKEN,
        },
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def text_config_dict(vocab_size: int, dtype: str = "float32") -> dict:
    vocab = vocabulary()
    return dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        vocab_size=vocab_size,
        **TEXT_SIZES,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        **chatml_text_token_ids(vocab),
        tie_word_embeddings=False,
        dtype=dtype,
    )


def build_hf_config(vocab_size: int, dtype: str = "float32"):
    from transformers import InternVLConfig

    vocab = vocabulary()
    vision_config = dict(
        **VISION_SIZES,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        attention_bias=True,
        use_qk_norm=False,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        use_mean_pooling=True,  # no final LayerNorm (as in InternVL3-*-hf)
        layer_scale_init_value=1.0,
        dtype=dtype,
    )
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config_dict(vocab_size, dtype),
        image_token_id=vocab[IMG_CONTEXT],
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,  # vLLM's interns1.py ignores this field and always uses the last layer
        vision_feature_select_strategy="default",  # drop [CLS]
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    config.dtype = dtype
    return config


def chat_config_dict(vocab_size: int, dtype: str = "float32") -> dict:
    """``config.json`` of the chat format (what ``OpenGVLab/InternVL2_5-*`` ship, reduced to the tiny sizes)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        },
        "vision_config": dict(
            architectures=["InternVisionModel"],
            model_type="intern_vit_6b",
            **VISION_SIZES,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            num_channels=3,
            qkv_bias=True,
            qk_normalization=False,
            norm_type="layer_norm",
            layer_norm_eps=1e-6,
            hidden_act="gelu",
            initializer_factor=1.0,  # layer-scale init (ls1, ls2)
            initializer_range=0.02,
            dropout=0.0,
            attention_dropout=0.0,
            drop_path_rate=0.0,
            use_flash_attn=False,
            dtype=dtype,
        ),
        "llm_config": text_config_dict(vocab_size, dtype),
        "select_layer": -1,
        "force_image_size": IMAGE_SIZE,
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "ps_version": "v2",
        "min_dynamic_patch": MIN_DYNAMIC_PATCH,
        "max_dynamic_patch": MAX_DYNAMIC_PATCH,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


# The remote-code config classes of the original checkpoints, reduced to what loading needs (MIT-licensed
# InternVL code: configuration_intern_vit.py / configuration_internvl_chat.py of OpenGVLab/InternVL2_5-*).
CONFIGURATION_INTERN_VIT = '''\
"""InternViT config (trimmed from OpenGVLab's configuration_intern_vit.py)."""
try:
    from transformers import PreTrainedConfig as _Base
except ImportError:  # transformers 4
    from transformers import PretrainedConfig as _Base


class InternVisionConfig(_Base):
    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                 num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                 use_flash_attn=True, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, dropout=0.0,
                 drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.qkv_bias = qkv_bias
        self.qk_normalization = qk_normalization
        self.use_flash_attn = use_flash_attn
'''

CONFIGURATION_INTERNVL_CHAT = '''\
"""InternVLChatConfig (trimmed from OpenGVLab's configuration_internvl_chat.py)."""
import copy

from transformers import AutoConfig

from .configuration_intern_vit import InternVisionConfig

try:
    from transformers import PreTrainedConfig as _Base
except ImportError:  # transformers 4
    from transformers import PretrainedConfig as _Base


class InternVLChatConfig(_Base):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0, select_layer=-1,
                 force_image_size=None, downsample_ratio=0.5, template=None, dynamic_image_size=False,
                 use_thumbnail=False, ps_version="v1", min_dynamic_patch=1, max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, InternVisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        if llm_config is None or isinstance(llm_config, dict):
            llm_config = dict(llm_config or {"architectures": ["Qwen2ForCausalLM"]})
            model_type = llm_config.pop("model_type", "qwen2")
            llm_config = AutoConfig.for_model(model_type, **llm_config)
        self.llm_config = llm_config
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.tie_word_embeddings = getattr(self.llm_config, "tie_word_embeddings", False)

    def to_dict(self):
        output = copy.deepcopy({k: v for k, v in self.__dict__.items() if not isinstance(v, _Base)})
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output
'''


def build_processor(tokenizer, fmt: str = "hf"):
    """HF format: transformers' ``InternVLProcessor`` (saved as ``processor_config.json`` etc.). The chat format has
    no processor files: vLLM builds its own processor from ``config.json`` (``InternVLProcessingInfo``)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = GotOcr2ImageProcessor(
        size=size, crop_to_patches=True, min_patches=MIN_DYNAMIC_PATCH, max_patches=MAX_DYNAMIC_PATCH,
        image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
    )
    video_processor = InternVLVideoProcessor(size=size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    return InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        image_seq_length=TOKENS_PER_TILE, chat_template=CHAT_TEMPLATES[fmt],
    )


def sharpen_attention(model, text_scale: float = 8.0, vision_scale: float = 4.0) -> None:
    """Scale q and k projections so a tiny random model attends far from uniformly
    (:func:`~textscythe_dev.tiny_common.scale_projections`)."""
    text_layers = model.model.language_model.layers
    vision_layers = model.model.vision_tower.encoder.layer
    scale_projections((p for layer in text_layers for p in (layer.self_attn.q_proj, layer.self_attn.k_proj)),
                      text_scale)
    scale_projections((p for layer in vision_layers for p in (layer.attention.q_proj, layer.attention.k_proj)),
                      vision_scale)


_CHAT_PREFIXES = (
    ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("model.vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("model.vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
    ("model.multi_modal_projector.linear_1.", "mlp1.1."),
    ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_CHAT_LAYER_PARTS = {
    "attention.projection_layer.": "attn.proj.", "layernorm_before.": "norm1.", "layernorm_after.": "norm2.",
    "lambda_1": "ls1", "lambda_2": "ls2", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
}


def chat_weight_name(hf_name: str) -> str:
    """The original (chat-format) name of an HF-format weight (q/k/v are fused separately, see
    :func:`to_chat_state_dict`)."""
    for old, new in _CHAT_PREFIXES:
        if hf_name.startswith(old):
            name = new + hf_name[len(old):]
            break
    else:
        raise KeyError(hf_name)
    if name.startswith("vision_model.encoder.layers."):
        head, _, rest = name[len("vision_model.encoder.layers."):].partition(".")
        for old, new in _CHAT_LAYER_PARTS.items():
            if rest.startswith(old):
                return f"vision_model.encoder.layers.{head}.{new}{rest[len(old):]}"
        raise KeyError(hf_name)
    return name


def to_chat_state_dict(hf_state: dict) -> dict:
    import torch

    out, pending = {}, {}
    for name, tensor in hf_state.items():
        if ".attention.q_proj." in name or ".attention.k_proj." in name or ".attention.v_proj." in name:
            layer, _, rest = name.partition(".attention.")
            pending.setdefault((layer, rest[2:]), {})[rest[0]] = tensor  # ("...layer.N", "_proj.weight") -> {q,k,v}
            continue
        out[chat_weight_name(name)] = tensor.contiguous()
    for (layer, suffix), parts in pending.items():
        index = layer.rsplit(".", 1)[1]
        kind = suffix.rsplit(".", 1)[1]  # weight / bias
        out[f"vision_model.encoder.layers.{index}.attn.qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]).contiguous()
    return out


def build_tiny_internvl(
    path: str | Path, *, fmt: str = "hf", with_weights: bool = False, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a tiny InternVL checkpoint directory (``fmt`` ``"hf"`` or ``"chat"``) to ``path`` and return it."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    tokenizer = build_tokenizer(fmt)
    hf_config = build_hf_config(len(tokenizer), dtype)
    kind = f"internvl-{fmt}"
    if fmt == "hf":
        return write_checkpoint(
            path, kind=kind, config=hf_config, tokenizer=tokenizer, processor=build_processor(tokenizer, fmt),
            with_weights=with_weights, seed=seed, dtype=dtype, adjust_weights=sharpen_attention,
        )
    # The chat format: remote-code config classes, a hand-written config.json, the HF-format weights renamed,
    # and no processor files.
    path = prepare_directory(path)
    (path / "configuration_intern_vit.py").write_text(CONFIGURATION_INTERN_VIT)
    (path / "configuration_internvl_chat.py").write_text(CONFIGURATION_INTERNVL_CHAT)
    with open(path / "config.json", "w") as f:
        json.dump(chat_config_dict(len(tokenizer), dtype), f, indent=2)
    with open(path / "generation_config.json", "w") as f:
        vocab = vocabulary()
        json.dump({"eos_token_id": vocab[IM_END], "pad_token_id": vocab[ENDOFTEXT]}, f, indent=2)
    if with_weights:
        from safetensors.torch import save_file

        model = seeded_model(hf_config, seed)
        sharpen_attention(model)
        save_file(to_chat_state_dict(model.state_dict()), path / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    write_marker(path, kind, with_weights=with_weights, seed=seed, dtype=dtype)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = builder_argument_parser("tiny_internvl")
    parser.add_argument("--fmt", choices=FORMATS, default="hf")
    args = parser.parse_args(argv)
    out = build_tiny_internvl(args.path, fmt=args.fmt, with_weights=args.with_weights, seed=args.seed)
    # vLLM has no config class for the chat format: the checkpoint's own code defines it
    flags = " --trust-remote-code" if args.fmt == "chat" else ""
    command = serve_command(out, with_weights=args.with_weights, flags=flags)
    print(f"wrote tiny InternVL ({args.fmt}) to {out} (serve: {command})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
