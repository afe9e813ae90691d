"""``textscythe-draw``: draw the kept patches of an explained request over the user's image.

    textscythe-draw --image photo.jpg --url http://localhost:8000 --request-id chatcmpl-... [--api-key KEY]
    textscythe-draw --image photo.jpg --explanation explanation.json --out kept.png

The explanation is the answer of ``GET /v1/textscythe/explanations/{id}`` (see docs/how-it-works.md): pruned
patches are dimmed, kept ones outlined (see :func:`draw_kept` for each layout); other layouts (video frames,
OneVision's merged views) are refused with their kept positions listed.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def key_words(item: dict[str, Any]) -> list[str]:
    return [token["token"].strip() for token in item.get("key_tokens", [])]


def draw_kept(image: Image.Image, item: dict[str, Any], dim: float = 0.25) -> Image.Image:
    """``image`` with the item's kept patches highlighted; raises ``ValueError`` for a layout it cannot draw.

    ``grid`` (one picture): the grid covers the central square the processor keeps after resizing the short side
    and centre-cropping (``"region": "centre-crop"``, LLaVA-1.5), or the whole picture (``"whole"``, Qwen2.5-VL). ``views`` (LLaVA-NeXT): the base
    view's kept patches over the whole picture (the base view is the picture resized to one square view); the
    kept rows of the tiles are counted in the title, not drawn.
    """
    layout = item.get("layout") or {}
    kept = item.get("kept_positions", [])
    if layout.get("kind") == "grid" and layout.get("frames", 1) == 1:
        rows, cols = int(layout["rows"]), int(layout["cols"])
        cells = [divmod(position, cols) for position in kept]
        region = _central_square(image) if layout.get("region") == "centre-crop" else (0, 0, *image.size)
    elif layout.get("kind") == "views":
        rows, cols = int(layout["view_rows"]), int(layout["view_cols"])
        patches = layout["row_to_patch"]
        cells = [divmod(patches[position], cols) for position in kept if 0 <= patches[position] < rows * cols]
        region = (0, 0, *image.size)
    else:
        raise ValueError(f"cannot draw layout {layout.get('kind')!r} (frames: {layout.get('frames', 1)}); kept "
                         f"positions: {kept}")
    left, top, right, bottom = region
    width, height = right - left, bottom - top
    base = image.convert("RGB")
    out = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 1.0 - dim)
    draw = ImageDraw.Draw(out)
    for row, col in cells:
        if row >= rows:
            continue
        box = (left + col * width // cols, top + row * height // rows,
               left + (col + 1) * width // cols, top + (row + 1) * height // rows)
        out.paste(base.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
    return out


def _central_square(image: Image.Image) -> tuple[int, int, int, int]:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def fetch(url: str, request_id: str, api_key: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/textscythe/explanations/{request_id}")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textscythe-draw", description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="the image the request sent")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--explanation", type=Path, help="a saved explanation (JSON)")
    source.add_argument("--url", help="the server's base URL (then --request-id)")
    parser.add_argument("--request-id", help="the response's id or the request's X-Request-Id")
    parser.add_argument("--api-key", help="the server's API key, if it has one")
    parser.add_argument("--item", type=int, default=0, help="which image of the request (default 0)")
    parser.add_argument("--out", type=Path, default=Path("kept_patches.png"))
    args = parser.parse_args(argv)
    if args.url and not args.request_id:
        parser.error("--url needs --request-id")
    explanation = (json.loads(args.explanation.read_text()) if args.explanation
                   else fetch(args.url, args.request_id, args.api_key))
    item = explanation["items"][args.item]
    try:
        drawn = draw_kept(Image.open(args.image), item)
    except ValueError as error:
        print(f"textscythe-draw: {error}", file=sys.stderr)
        return 1
    drawn.save(args.out)
    print(f"{args.out}: kept {item.get('kept')} of {item.get('num_tokens')} tokens ({item.get('selector')}); "
          f"key words: {', '.join(key_words(item)) or '(none)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
