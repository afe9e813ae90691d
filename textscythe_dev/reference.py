"""Pieces of the independent transformers references the equivalence tests build (written out here, not taken
from the plugin, so a shared mistake cannot hide)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any


def eager_checkpoint(model_class: Any, model_dir: Path, dtype: Any = None) -> tuple[Any, Any]:
    """``(processor, model)`` of a saved checkpoint: the weights loaded in ``dtype`` (float32 by default), computed
    in float32, eval mode, eager attention (so that a reference can read the attention weights)."""
    import torch
    from transformers import AutoProcessor

    model = model_class.from_pretrained(model_dir, dtype=torch.float32 if dtype is None else dtype,
                                        attn_implementation="eager")
    return AutoProcessor.from_pretrained(model_dir), model.eval().float()


@contextlib.contextmanager
def attention_weights_of(modeling: Any, module: Any) -> Iterator[list[Any]]:
    """Within the block, the attention weights ``[batch, heads, queries, keys]`` that ``module`` computes through
    ``modeling.eager_attention_forward`` (a transformers modeling file's eager attention), appended to the list
    this yields, one tensor a call."""
    original = modeling.eager_attention_forward
    weights: list[Any] = []

    def capture(attention_module: Any, *args: Any, **kwargs: Any) -> Any:
        output, attention = original(attention_module, *args, **kwargs)
        if attention_module is module:
            weights.append(attention)
        return output, attention

    modeling.eager_attention_forward = capture
    try:
        yield weights
    finally:
        modeling.eager_attention_forward = original


def greedy_decode(next_logits: Callable[[list[int]], Any], steps: int) -> tuple[list[int], list[float], Any]:
    """Greedy decoding without a KV cache: ``next_logits(generated)`` gives the logits after the prompt and the
    tokens generated so far. Returns the tokens, the log-probability of each, and the first step's logits."""
    import torch

    tokens: list[int] = []
    logprobs: list[float] = []
    first_logits = None
    for _ in range(steps):
        logits = next_logits(tokens).float()
        first_logits = logits if first_logits is None else first_logits
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
    return tokens, logprobs, first_logits


def largest_difference(one: Sequence[float], other: Sequence[float]) -> float:
    """The largest absolute difference between two equally long lists of log-probabilities; NaN when any is NaN
    (so that neither ``<= tolerance`` nor ``> floor`` holds)."""
    differences = [abs(a - b) for a, b in zip(one, other, strict=True)]
    return math.nan if any(math.isnan(difference) for difference in differences) else max(differences)


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


def chatml_instructions(tokenizer: Any, ids: Sequence[int], pads: Collection[int]) -> list[list[int]]:
    """:func:`user_message_instructions` for a ChatML template (``<|im_start|>user`` ... ``<|im_end|>``): per
    item, the ids of its user message minus special and placeholder ids."""
    return user_message_instructions(ids, tokenizer.encode("<|im_start|>user", add_special_tokens=False),
                                     tokenizer.encode("<|im_end|>", add_special_tokens=False), pads,
                                     {*tokenizer.all_special_ids, *pads})
