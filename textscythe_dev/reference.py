"""Pieces of the independent transformers references the equivalence tests build (written out here, not taken
from the plugin, so a shared mistake cannot hide)."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def user_message_instructions(ids: Sequence[int], opener: Sequence[int], closer: Sequence[int],
                              pads: Collection[int], excluded: Collection[int]) -> list[list[int]]:
    """Per item (each token in ``pads`` starts one): the ids of the user message holding it -- after the last
    ``opener`` before it, up to the first ``closer`` after it -- minus the ``excluded`` ids (special tokens,
    placeholders). The rule of docs/how-it-works.md, for one chat format's delimiters."""
    ids = list(ids)
    opener, closer = list(opener), list(closer)
    result = []
    for position in (i for i, token in enumerate(ids) if token in pads):
        start = max((i + len(opener) for i in range(position - len(opener) + 1) if ids[i:i + len(opener)] == opener),
                    default=0)
        end = next((i for i in range(position + 1, len(ids) - len(closer) + 1) if ids[i:i + len(closer)] == closer),
                   len(ids))
        result.append([token for token in ids[start:end] if token not in excluded])
    return result
