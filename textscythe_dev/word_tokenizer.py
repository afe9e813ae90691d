"""The word-level tokenizer every tiny test checkpoint uses (no download, no training).

A ``tokenizers`` ``WordLevel`` model over a few hundred common English words (lower-cased; unknown words map to
the first special token), punctuation and single digits, preceded by the checkpoint family's special tokens --
whose order fixes their ids -- and wrapped in ``PreTrainedTokenizerFast`` with the family's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PUNCTUATION = list(".,?!:;'\"()-/&%$#+=*")
DIGITS = list("0123456789")
# A few hundred common English words: enough for typical VQA-style questions and answers.
_WORD_TEXT = """
a an the this that these those there here it its is are was were be been being am do does did done doing
have has had having will would can could should may might must shall not no yes i me my mine you your
yours he him his she her hers we us our they them their what which who whom whose when where why how
many much more most less least few some any all each every both either neither other another such only
own same so than too very just also again ever never always often and or but if then else because while
until of in on at by for with about against between into through during before after above below to from
up down out off over under near far inside outside behind front beside next left right top bottom middle
center centre side around across along colour color colours colors red orange yellow green blue purple
pink brown black white gray grey gold silver dark light bright pale one two three four five six seven
eight nine ten eleven twelve first second third last number count image picture photo photograph scene
view shown show shows see seen look looks looking visible describe description detail details answer
question word words sentence short long brief briefly please tell explain give name list identify read
text written sign label letter letters man men woman women person people boy girl child children baby
player players crowd family dog dogs cat cats bird birds horse horses cow cows sheep elephant elephants
bear bears zebra zebras giraffe giraffes animal animals fish car cars bus buses truck trucks train
trains bike bicycle motorcycle boat boats plane airplane vehicle road street sidewalk traffic stop
parking umbrella umbrellas hat cap shirt jacket coat dress shoes glasses bag backpack tie table chair
chairs bed couch sofa desk shelf door window windows wall floor room kitchen bathroom house building
buildings tower bridge fence roof tree trees grass flower flowers plant plants field park garden forest
mountain mountains hill sky cloud clouds sun snow rain water river lake sea ocean beach sand rock rocks
food pizza cake sandwich fruit banana bananas apple apples orange oranges bowl plate cup glass bottle
knife fork spoon phone computer laptop screen keyboard mouse clock book books ball kite frisbee
skateboard surfboard skis racket bat shape shapes circle square triangle rectangle star line lines big
small large little tall short wide narrow round flat open closed full empty new old young hot cold warm
wet dry clean dirty happy sad good bad best better same different similar holding hold holds wearing
wear wears sitting sit sits standing stand stands walking walk walks running run runs riding ride rides
eating eat eats playing play plays flying fly flies carrying carry lying lie using use uses waiting wait
looking watching watch day night morning evening time year years today kind type sort part parts piece
pieces thing things object objects area place main background foreground helpful help assistant reply
respond single phrase based provided
"""
WORDS = _WORD_TEXT.split()


def im_chat_template(image_text: str, video_text: str) -> str:
    """A Qwen-style (ChatML) chat template -- ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
    ``<|im_start|>assistant\\n`` as the generation prompt -- rendering image and video content parts as
    ``image_text`` / ``video_text`` where they appear (no default system prompt)."""

    def literal(text: str) -> str:
        return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")

    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] in ['image', 'image_url', 'image_pil'] -%}"
        f"{{{{- '{literal(image_text)}' -}}}}"
        "{%- elif part['type'] in ['video', 'video_url'] -%}"
        f"{{{{- '{literal(video_text)}' -}}}}"
        "{%- elif part['type'] == 'text' -%}"
        "{{- part['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


def word_vocabulary(special_tokens: Sequence[str]) -> dict[str, int]:
    """Token -> id: ``special_tokens`` first (in order), then punctuation, digits, role names and the words."""
    vocab: dict[str, int] = {}
    for token in (*special_tokens, *PUNCTUATION, *DIGITS, "user", "assistant", "system", *WORDS):
        vocab.setdefault(token, len(vocab))
    return vocab


def build_word_tokenizer(
    special_tokens: Sequence[str], *, chat_template: str, bos_token: str | None = None, **tokenizer_kwargs: Any
):
    """A ``PreTrainedTokenizerFast`` over :func:`word_vocabulary`; ``special_tokens[0]`` is the unknown token.

    With ``bos_token`` every encoded text starts with it (LLaVA/Llama style). ``tokenizer_kwargs`` go to
    ``PreTrainedTokenizerFast`` (``eos_token``, ``pad_token``, ``extra_special_tokens``, ...).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = word_vocabulary(special_tokens)
    unk_token = special_tokens[0]
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk_token))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    # Word-level decoding: words joined by spaces, no space before punctuation.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, vocab[bos_token])],
        )
        tokenizer_kwargs["bos_token"] = bos_token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk_token, padding_side="left", chat_template=chat_template,
        **tokenizer_kwargs,
    )
    for token in special_tokens:
        assert tokenizer.convert_tokens_to_ids(token) == vocab[token], token
    return tokenizer
