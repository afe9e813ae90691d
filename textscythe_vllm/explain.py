"""Why these tokens: a per-request record of what TextScythe distilled and kept, for clients that ask.

A request with ``"visual_token_explain": true`` (and a budget) gets, for each image and video it prunes, a record
that ``GET /v1/textscythe/explanations/{id}`` returns -- ``id`` being the response's ``id`` (``chatcmpl-...``,
``resp_...``) or the client's ``X-Request-Id``. The pieces come from two processes:

* the **API server's processor** writes the request part: the ids the request is known by, and per item its
  modality, its instruction decoded token by token, and a fresh explain id (which the item's pruning plan carries,
  so the item is selected anew rather than served from the encoder cache -- the record always describes a
  selection that ran);
* the **worker** writes the item part when it selects: key tokens and every instruction token's Entropy-Ratio,
  the relevant-set size, the kept positions with the layout to draw them, the selector and its time.

Both go to one directory (``TEXTSCYTHE_EXPLAIN_DIR``, created by the root process and inherited by every process
vLLM spawns, so several API servers and the workers share it). It holds at most :data:`MAX_RECORDS` files of each
kind (oldest removed first); request ids become SHA-256 file names, so a client's id never names a path.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from textscythe_vllm import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

EXPLAIN_DIR_ENV = "TEXTSCYTHE_EXPLAIN_DIR"
#: Files kept per kind (request records, item records); older ones are removed.
MAX_RECORDS = int(os.environ.get("TEXTSCYTHE_EXPLAIN_MAX_RECORDS", "4096"))
ROUTE_PREFIX = "/v1/textscythe/explanations/"
_PRUNE_EVERY = 64
_writes = 0
_writes_lock = threading.Lock()


def setup_process() -> None:
    """Root process only: create the shared directory and export it to the processes vLLM spawns."""
    if multiprocessing.parent_process() is not None or os.environ.get(EXPLAIN_DIR_ENV):
        return
    directory = tempfile.mkdtemp(prefix="textscythe-explain-")
    os.environ[EXPLAIN_DIR_ENV] = directory
    atexit.register(shutil.rmtree, directory, True)


def _directory(kind: str) -> Path | None:
    root = os.environ.get(EXPLAIN_DIR_ENV)
    if not root:
        return None
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def _request_file(request_id: str) -> str:
    return hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest() + ".json"


def _write(kind: str, name: str, record: dict[str, Any]) -> None:
    """Atomic write (temp file + rename); never raises (an explanation must not fail a request)."""
    global _writes
    directory = _directory(kind)
    if directory is None:
        return
    try:
        temporary = directory / f".{name}.{os.getpid()}.{threading.get_ident()}"
        temporary.write_text(json.dumps(record))
        os.replace(temporary, directory / name)
        with _writes_lock:
            _writes += 1
            prune = _writes % _PRUNE_EVERY == 0
        if prune:
            _prune(directory)
    except OSError:
        logger.warning("textscythe: could not write an explanation record in %s", directory, exc_info=True)


def _prune(directory: Path) -> None:
    entries = []
    for entry in os.scandir(directory):
        if entry.name.endswith(".json"):
            try:
                entries.append((entry.stat().st_mtime, entry.path))
            except OSError:
                continue
    entries.sort()
    for _, path in entries[: max(0, len(entries) - MAX_RECORDS)]:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _read(kind: str, name: str) -> dict[str, Any] | None:
    directory = _directory(kind)
    if directory is None:
        return None
    try:
        return json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return None


# --- writers -------------------------------------------------------------------------------------------------
def record_request(request_ids: list[str], model: str, items: list[dict[str, Any]]) -> None:
    """Processor (API server): the request part, filed under every id the request is known by."""
    record = {"ids": request_ids, "model": model, "created": int(time.time()), "items": items}
    for request_id in request_ids:
        _write("requests", _request_file(request_id), record)


def record_item(explain_id: int, record: dict[str, Any]) -> None:
    """Worker: the selection of one item."""
    _write("items", f"{explain_id}.json", record)


def grid_layout(num_rows: int) -> dict[str, Any]:
    """The layout of an item whose rows are one square patch grid (LLaVA-1.5), else a plain sequence."""
    side = round(num_rows ** 0.5)
    if side * side == num_rows:
        return patch_grid(side, side)
    return {"kind": "sequence", "length": num_rows}


def patch_grid(rows: int, cols: int, frames: int = 1, region: str = "centre-crop") -> dict[str, Any]:
    """Rows that are ``frames`` x ``rows`` x ``cols`` patches in raster order (Qwen2.5-VL: merged patches, frames
    being temporal patches of a video). ``region``: the part of the picture the grid covers -- ``centre-crop``
    (the processor resizes the short side and crops the centre square: LLaVA-1.5) or ``whole`` (Qwen2.5-VL)."""
    layout: dict[str, Any] = {"kind": "grid", "rows": rows, "cols": cols, "region": region}
    if frames > 1:
        layout["frames"] = frames
    return layout


def views_layout(row_to_patch: list[int], views: int, side: int) -> dict[str, Any]:
    """Rows merged from several square views (LLaVA-NeXT: the base view then the tiles): each row's index in the
    stacked ``views x side x side`` tower patches, -1 for a newline row."""
    return {"kind": "views", "views": views, "view_rows": side, "view_cols": side, "row_to_patch": row_to_patch}


# --- the route -----------------------------------------------------------------------------------------------
def lookup(request_id: str) -> dict[str, Any] | None:
    """The explanation of ``request_id`` (as the client saw it: ``chatcmpl-<id>``, ``resp_<id>``, its
    ``X-Request-Id``), or ``None`` when no such request asked for one (or it was evicted)."""
    candidates = [request_id] + [request_id[len(prefix):] for prefix in ("chatcmpl-", "cmpl-")
                                 if request_id.startswith(prefix)]
    for candidate in candidates:
        request = _read("requests", _request_file(candidate))
        if request is not None:
            break
    else:
        return None
    items = []
    for item in request["items"]:
        selection = _read("items", f"{item['explain_id']}.json")
        merged = {key: value for key, value in item.items() if key not in ("explain_id", "instruction")}
        if selection is None:
            merged["status"] = "pending"
            items.append(merged)
            continue
        words = item["instruction"]
        ratios = selection.pop("entropy_ratio", None)
        if ratios is None or len(ratios) != len(words):
            ratios = [None] * len(words)
        key_indices = selection.pop("key_token_indices", [])
        merged["status"] = "selected"
        merged["instruction"] = [{"token": word, "entropy_ratio": ratio} for word, ratio in zip(words, ratios, strict=True)]
        merged["key_tokens"] = [
            {"token": words[index], "entropy_ratio": ratios[index]} for index in key_indices if index < len(words)
        ]
        merged.update(selection)
        items.append(merged)
    return {"id": request_id, "object": "textscythe.explanation", "model": request["model"],
            "created": request["created"], "items": items}
