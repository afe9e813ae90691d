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


def video_data_url(seed: int, num_frames: int = 8, width: int = 168, height: int = 112, fps: float = 2.0) -> str:
    """An mp4 (OpenCV's mp4v codec) of :func:`~textscythe_dev.tiny_qwen.tiny_video` frames, as a data URL."""
    import os
    import tempfile

    import cv2

    from textscythe_dev.tiny_qwen import tiny_video

    frames, _ = tiny_video(seed, num_frames, width, height, fps)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        with open(path, "rb") as clip:
            return "data:video/mp4;base64," + base64.b64encode(clip.read()).decode()


def decoded_frames(data: bytes) -> list[np.ndarray]:
    """The mp4 ``data``'s frames (RGB ``[H, W, 3]``), decoded one by one with OpenCV as vLLM's OpenCV video
    backend decodes them, nothing sampled."""
    import os
    import tempfile

    import cv2

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "clip.mp4")
        with open(path, "wb") as clip:
            clip.write(data)
        capture = cv2.VideoCapture(path)
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
    return frames


def media_message(text: str, images: tuple[Image.Image, ...] | list[Image.Image] = (),
                  videos: tuple[str, ...] | list[str] = ()) -> dict[str, object]:
    """A user message: the images, then the videos (data URLs), then the text."""
    content: list[dict[str, object]] = [image_part(image) for image in images]
    content += [{"type": "video_url", "video_url": {"url": url}} for url in videos]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}
