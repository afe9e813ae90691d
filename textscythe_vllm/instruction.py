"""Which prompt tokens are an item's *instruction*: the words of the user message that carries it.

TextScythe distils "the user's instruction" (paper, Sec. 3). Real deployments wrap it in an operator's system
prompt, role words and template tokens; putting those into the instruction raises ``T`` and with it the
thresholds of Eqs. 3 and 5, until the question-blind fill decides what is kept (docs/how-it-works.md,
"The instruction"). So the instruction of an image or video is the text of the user message holding it:

* The processor sees token ids, not messages. The chat template's own delimiters are learnt once per tokenizer
  by rendering it with sentinel messages (:func:`learn_template_markers`): the tokens that open a user message's
  content, and those that can end it (the user turn's closer, the assistant opener, the generation prompt, the
  next user opener). Tokenising the rendered sentinel conversation with offsets gives the delimiters as they
  are tokenised *in context*, so no template is hard-coded.
* For the item at prompt position ``p``: from the end of the last user opener before ``p`` to the first
  closing delimiter after ``p`` (:func:`user_spans`), minus special tokens, placeholders and whitespace-only
  tokens. Every item of one user message gets that message's whole text (text before and after the item, all
  parts); system and developer messages, earlier turns and assistant replies are outside the span.
* A later turn never changes an earlier item's span, so an item is selected once, at its own turn, and later
  turns hit the encoder and prefix caches.
* Fallback (a raw prompt that does not follow the template, or a tokenizer without a chat template): the span
  starts at the prompt's start and ends at the first closing delimiter after the item, or the prompt's end.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from textscythe_vllm import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

_SENTINELS = ("zqxsentinelone", "zqxsentineltwo", "zqxsentinelthree")


@dataclass(frozen=True)
class TemplateMarkers:
    """A chat template's delimiters around a user message's content, as token ids."""

    user_open: tuple[int, ...] = ()
    #: Token sequences that can end a user message's content (the first one after the item wins).
    ends: tuple[tuple[int, ...], ...] = ()


def find_subsequence(sequence: Sequence[int], pattern: Sequence[int], start: int) -> int:
    """Index of the first occurrence of ``pattern`` in ``sequence[start:]``, or ``len(sequence)``."""
    width = len(pattern)
    if width:
        first = pattern[0]
        for index in range(start, len(sequence) - width + 1):
            if sequence[index] == first and list(sequence[index:index + width]) == list(pattern):
                return index
    return len(sequence)


def _find_last_end(sequence: Sequence[int], pattern: Sequence[int], stop: int) -> int | None:
    """Index just past the last occurrence of ``pattern`` ending at or before ``stop``, or ``None``."""
    width = len(pattern)
    if not width:
        return None
    for index in range(stop - width, -1, -1):
        if list(sequence[index:index + width]) == list(pattern):
            return index + width
    return None


def user_spans(prompt: Sequence[int], positions: Sequence[int], markers: TemplateMarkers) -> list[tuple[int, int]]:
    """``[start, end)`` of the user message around each item position (see module docstring)."""
    spans = []
    for position in positions:
        start = _find_last_end(prompt, markers.user_open, position) or 0
        end = min((find_subsequence(prompt, closer, position + 1) for closer in markers.ends), default=len(prompt))
        spans.append((start, end))
    return spans


def instruction_token_ids(
    prompt: Sequence[int],
    positions: Sequence[int],
    *,
    excluded_ids: frozenset[int],
    markers: TemplateMarkers,
) -> list[tuple[int, ...]]:
    """The instruction of each item: the text tokens of the user message holding it (``excluded_ids``: special,
    placeholder and whitespace-only tokens)."""
    return [
        tuple(token for token in prompt[start:end] if token not in excluded_ids)
        for start, end in user_spans(prompt, positions, markers)
    ]


# --- learning the template's delimiters ---------------------------------------------------------------------
def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The template rendered as text; content as a list of text parts first (templates such as llava-hf's
    iterate parts), then as plain strings."""
    as_parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    try:
        return tokenizer.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokens_with_sentinels(tokenizer: Any, text: str) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """Token ids of ``text`` (as vLLM tokenises a rendered chat: no extra special tokens) and, per sentinel in it,
    the ``[first, last + 1)`` token range overlapping it."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    ranges = {}
    for sentinel in _SENTINELS:
        where = text.find(sentinel)
        if where < 0:
            continue
        covering = [i for i, (a, b) in enumerate(offsets) if a < where + len(sentinel) and b > where]
        if covering:
            ranges[sentinel] = (covering[0], covering[-1] + 1)
    return ids, ranges


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    size = 0
    while size < min(len(a), len(b)) and a[len(a) - 1 - size] == b[len(b) - 1 - size]:
        size += 1
    return tuple(a[len(a) - size:])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return tuple(a[:size])


def _trim(tokens: Sequence[int], blank: frozenset[int]) -> tuple[int, ...]:
    start, end = 0, len(tokens)
    while start < end and tokens[start] in blank:
        start += 1
    while end > start and tokens[end - 1] in blank:
        end -= 1
    return tuple(tokens[start:end])


def learn_template_markers(tokenizer: Any, blank_ids: frozenset[int]) -> TemplateMarkers:
    """The delimiters of ``tokenizer``'s chat template, learnt by rendering sentinel conversations.

    ``[user A]`` and ``[user A, assistant B, user C]`` are rendered and tokenised; the user opener is what
    precedes a user message's content in both (their common token suffix), the user closer what follows it in
    both (common prefix); the assistant opener and generation prompt are what follows the closer. Any failure
    (no template, a template that cannot render these) gives empty markers: the documented fallback.
    """
    if not getattr(tokenizer, "chat_template", None):
        return TemplateMarkers()
    one, two, three = _SENTINELS
    try:
        single_ids, single = _tokens_with_sentinels(tokenizer, _render(tokenizer, [{"role": "user", "content": one}],
                                                                       generation_prompt=True))
        chat_ids, chat = _tokens_with_sentinels(tokenizer, _render(tokenizer, [
            {"role": "user", "content": one}, {"role": "assistant", "content": two}, {"role": "user", "content": three},
        ], generation_prompt=False))
        if one not in single or not {one, two, three} <= chat.keys():
            raise ValueError("the sentinel messages do not appear in the rendered template")
        user_open = _common_suffix(single_ids[:single[one][0]], chat_ids[chat[two][1]:chat[three][0]])
        after_single = single_ids[single[one][1]:]  # user closer + generation prompt
        between = chat_ids[chat[one][1]:chat[two][0]]  # user closer + assistant opener
        user_close = _common_prefix(after_single, between)
        generation_prompt = after_single[len(user_close):]
        assistant_open = between[len(user_close):]
    except Exception:
        logger.warning("textscythe: could not learn the chat template's user turns; the instruction of an item is "
                       "the prompt's text up to its generation prompt", exc_info=True)
        return TemplateMarkers()
    ends = tuple(dict.fromkeys(
        trimmed for trimmed in (_trim(seq, blank_ids) for seq in (user_close, assistant_open, generation_prompt,
                                                                  user_open)) if trimmed
    ))
    return TemplateMarkers(user_open=_trim(user_open, blank_ids), ends=ends)


class TokenizerFacts:
    """Per-tokenizer facts the instruction rule needs, computed once per processor (thread-safe)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._facts: tuple[frozenset[int], TemplateMarkers] | None = None

    def get(self, tokenizer: Any, placeholder_ids: Sequence[int]) -> tuple[frozenset[int], TemplateMarkers]:
        """``(excluded ids, template markers)``: special tokens, placeholders and whitespace-only tokens are never
        part of an instruction."""
        with self._guard:
            if self._facts is None:
                blank = blank_token_ids(tokenizer)
                excluded = frozenset(int(i) for i in tokenizer.all_special_ids) | frozenset(placeholder_ids) | blank
                self._facts = (excluded, learn_template_markers(tokenizer, blank))
            return self._facts


def blank_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the vocabulary's tokens that decode to whitespace only (newlines, spaces, tabs)."""
    vocab = tokenizer.get_vocab()
    blank = set()
    for token, token_id in vocab.items():
        if token.strip(" \t\n\r\u2581\u0120\u010a") == "":  # sentencepiece/byte-level spellings of blanks
            text = tokenizer.convert_tokens_to_string([token])
            if not text.strip():
                blank.add(int(token_id))
    return frozenset(blank)
