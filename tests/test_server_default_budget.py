"""A server-wide default budget (``--mm-processor-kwargs``): applies to requests without one, a request value
overrides it, and a request may still keep every token. (That profiling stays unpruned under a default budget
is asserted at processor level in test_glue_units.py.)"""

from __future__ import annotations

import json

import pytest

from textscythe_dev.images import scene, user_message
from textscythe_dev.server import Served

pytestmark = pytest.mark.server
IMAGE_TOKENS = 576
QUESTION = "what colour is the umbrella ?"


SERVED = Served("tiny_llava_dir", ("--load-format", "dummy", "--mm-processor-kwargs", json.dumps({"visual_token_budget": 192})),
                timeout=120)


def prompt_tokens(client, server, messages, **extra):
    return client.chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=2, temperature=0.0, extra_body=extra or None
    ).usage.prompt_tokens


def test_default_budget_and_override(client, server):
    messages = [user_message(QUESTION, scene(21))]
    text_only = prompt_tokens(client, server, [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    assert prompt_tokens(client, server, messages) == text_only + 192  # server default
    assert prompt_tokens(client, server, messages, visual_token_budget=32) == text_only + 32  # request wins
    assert prompt_tokens(client, server, messages, visual_token_budget=10_000) == text_only + IMAGE_TOKENS
    assert server.alive()
