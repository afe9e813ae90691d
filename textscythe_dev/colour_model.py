"""A LLaVA-1.5-shaped checkpoint whose right answer is known by construction: a patch's visual token *is* the
LLM's input embedding of its colour's word.

Hand-set weights (everything else random, from ``seed``):

* **Vision tower** (CLIP, 336 px / 14 px patches, 576 patches): the patch embedding writes each patch's mean
  ``(r, g, b)`` and its negation into six channels; the position embedding adds a constant pair ``(k, -k)``.
  Every channel pair sums to zero, so CLIP's pre-LayerNorm keeps the direction of ``(r, g, b, -r, -g, -b, k,
  -k)`` and only rescales it -- the colour survives, black included. The encoder layers' residual branches are
  zeroed (``out_proj`` and ``fc2``), so the feature layer passes that vector through unchanged. The query and key
  projections are zeroed too: the [CLS] attention is uniform, so TextScythe's fill is pure diversity and what
  differs between two questions is only what they ask about.
* **Projector**: ``linear_1`` has one unit per palette colour, ``s * (cos(u, colour) - 0.9)`` -- positive only for
  the patch's own colour (palette colours are at most 0.82 apart in cosine) -- and GELU keeps just that unit;
  ``linear_2`` maps the unit to the LLM's input embedding of the colour's word. So a red patch's projected token
  equals ``embed("red")`` (to float rounding) and TextScythe's similarity of "red" to it is 1.
* The image processor neither resizes a 336 x 336 image nor normalises (mean 0, std 1), so pixel colours reach
  the tower exactly; scenes are drawn on the 14 px patch grid so every patch has one colour.

:func:`colour_scene` draws such scenes; :func:`shape_patches` gives the patch indices of each shape, which is the
right answer for "where is the red rectangle?".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from textscythe_dev.tiny_common import restore_vision_model_prefix
from textscythe_dev.tiny_models import IMAGE_SIZE, PATCH_SIZE, build_tiny_llava

GRID = IMAGE_SIZE // PATCH_SIZE  # 24 patches a side
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
_CONSTANT = 0.2  # the (k, -k) channel pair: keeps black a direction of its own after the LayerNorm
_THRESHOLD = 0.9  # cosine a patch must have with a palette colour to light its unit
_UNIT_GAIN = 10.0  # the matching unit's pre-activation: GELU(10) = 10 to float precision


@dataclass(frozen=True)
class Shape:
    """A colour block on the patch grid: rows ``[top, bottom)`` x cols ``[left, right)``, optionally a disc."""

    colour: str
    top: int
    left: int
    bottom: int
    right: int
    disc: bool = False

    def patches(self) -> list[int]:
        rows, cols = self.bottom - self.top, self.right - self.left
        cy, cx = self.top + rows / 2 - 0.5, self.left + cols / 2 - 0.5
        return [
            r * GRID + c
            for r in range(self.top, self.bottom) for c in range(self.left, self.right)
            if not self.disc or (r - cy) ** 2 / (rows / 2) ** 2 + (c - cx) ** 2 / (cols / 2) ** 2 <= 1.0
        ]


#: A red rectangle over a quarter of the image, a small blue disc and a small yellow square on black.
DEFAULT_SHAPES = (Shape("red", 0, 0, 12, 12), Shape("blue", 15, 15, 20, 20, disc=True), Shape("yellow", 3, 17, 6, 20))


def colour_scene(shapes: tuple[Shape, ...] = DEFAULT_SHAPES, background: str = "black") -> Image.Image:
    canvas = np.zeros((GRID, GRID, 3), dtype=np.uint8)
    canvas[:] = PALETTE[background]
    for shape in shapes:
        for patch in shape.patches():
            canvas[patch // GRID, patch % GRID] = PALETTE[shape.colour]
    return Image.fromarray(np.repeat(np.repeat(canvas, PATCH_SIZE, axis=0), PATCH_SIZE, axis=1))


def shape_patches(shapes: tuple[Shape, ...] = DEFAULT_SHAPES) -> dict[str, list[int]]:
    """Patch indices (row-major on the 24 x 24 grid) of each shape, keyed by colour."""
    return {shape.colour: shape.patches() for shape in shapes}


def _channel_vector(rgb: tuple[int, int, int], width: int) -> np.ndarray:
    r, g, b = (value / 255.0 for value in rgb)
    vector = np.zeros(width)
    vector[:8] = (r, g, b, -r, -g, -b, _CONSTANT, -_CONSTANT)
    return vector


def build_colour_llava(path: str | Path, *, seed: int = 0) -> Path:
    """Write the checkpoint to ``path`` (config, tokenizer, processor, ``model.safetensors``) and return it."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    path = build_tiny_llava(path, kind="llava-1.5", with_weights=False, seed=seed)
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    vision = model.model.vision_tower  # transformers 5: the CLIP tower without its vision_model level
    width = config.vision_config.hidden_size
    with torch.no_grad():
        patch = torch.zeros_like(vision.embeddings.patch_embedding.weight)  # [width, 3, 14, 14]
        for channel in range(3):
            patch[channel, channel] = 1.0 / PATCH_SIZE**2
            patch[channel + 3, channel] = -1.0 / PATCH_SIZE**2
        vision.embeddings.patch_embedding.weight.copy_(patch)
        vision.embeddings.class_embedding.zero_()
        positions = torch.zeros_like(vision.embeddings.position_embedding.weight)
        positions[:, 6], positions[:, 7] = _CONSTANT, -_CONSTANT
        vision.embeddings.position_embedding.weight.copy_(positions)
        vision.pre_layrnorm.weight.fill_(1.0)
        vision.pre_layrnorm.bias.zero_()
        for layer in vision.encoder.layers:
            for zeroed in (layer.self_attn.out_proj, layer.mlp.fc2, layer.self_attn.q_proj, layer.self_attn.k_proj):
                zeroed.weight.zero_()
                zeroed.bias.zero_()
        projector = model.model.multi_modal_projector
        embeddings = model.get_input_embeddings().weight  # [V, D]
        names = list(PALETTE)
        scale = _UNIT_GAIN / (1.0 - _THRESHOLD) / np.sqrt(width)  # LayerNorm output norm is sqrt(width)
        projector.linear_1.weight.zero_()
        projector.linear_1.bias.zero_()
        projector.linear_2.weight.zero_()
        projector.linear_2.bias.zero_()
        activation = torch.nn.functional.gelu(torch.tensor(_UNIT_GAIN, dtype=torch.float64)).item()
        for unit, name in enumerate(names):
            direction = _channel_vector(PALETTE[name], width)
            direction /= np.linalg.norm(direction)
            projector.linear_1.weight[unit] = torch.tensor(direction * scale, dtype=torch.float32)
            projector.linear_1.bias[unit] = -scale * np.sqrt(width) * _THRESHOLD
            word = tokenizer.convert_tokens_to_ids(name)
            projector.linear_2.weight[:, unit] = embeddings[word] / activation
    model.save_pretrained(path, safe_serialization=True, max_shard_size="10GB")
    restore_vision_model_prefix(path)
    processor.image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
    )
    processor.save_pretrained(path)
    record = json.loads((path / "textscythe_tiny_model.json").read_text())
    record.update(kind="llava-1.5-colour", with_weights=True, palette=names)
    (path / "textscythe_tiny_model.json").write_text(json.dumps(record, indent=2))
    return path
