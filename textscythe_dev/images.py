"""Small synthetic images and OpenAI-style content parts for tests and the demo."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def scene(seed: int = 0, width: int = 336, height: int = 336) -> Image.Image:
    """A deterministic picture: smooth background with a few coloured blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    canvas = np.stack([x / width, y / height, np.full_like(x, 0.5, dtype=float)], axis=-1) * 200
    for _ in range(4):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(20, 70)
        colour = rng.integers(0, 255, size=3)
        canvas[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = colour
    return Image.fromarray(canvas.astype(np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(image: Image.Image) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def user_message(text: str, *images: Image.Image) -> dict[str, object]:
    return {"role": "user", "content": [*(image_part(image) for image in images), {"type": "text", "text": text}]}
