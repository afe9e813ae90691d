"""``textscythe-draw``: draw the kept patches of an explained request over the user's image.

    textscythe-draw --image photo.jpg --url http://localhost:8000 --request-id chatcmpl-... [--api-key KEY]
    textscythe-draw --image photo.jpg --explanation explanation.json --out kept.png

The explanation is the answer of ``GET /v1/textscythe/explanations/{id}`` (see docs/how-it-works.md). Items laid
out as one patch grid (``layout.kind == "grid"``: LLaVA-1.5's 24 x 24) are drawn over the central square of the
image -- the region the model's processor keeps after resizing the short side and centre-cropping --, pruned
patches dimmed, kept ones outlined; the title names the key words TextScythe found. Other layouts are listed.
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
    """``image`` with the item's kept patches (grid layouts) highlighted; raises ``ValueError`` otherwise."""
    layout = item.get("layout") or {}
    if layout.get("kind") != "grid":
        raise ValueError(f"cannot draw layout {layout.get('kind')!r}: kept positions {item.get('kept_positions')}")
    rows, cols = int(layout["rows"]), int(layout["cols"])
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    base = image.convert("RGB")
    dimmed = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 1.0 - dim)
    out = dimmed.copy()
    draw = ImageDraw.Draw(out)
    kept = set(item.get("kept_positions", []))
    for position in kept:
        row, col = divmod(position, cols)
        if row >= rows:
            continue
        box = (left + col * side // cols, top + row * side // rows,
               left + (col + 1) * side // cols, top + (row + 1) * side // rows)
        out.paste(base.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
    return out


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
