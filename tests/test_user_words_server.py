"""What the user said decides what is kept -- under any system prompt, in a 3-turn chat, with two images in one
message -- and the explain route shows why. Real ``vllm serve`` (documented launch plus ``--api-key``) on the
hand-wired colour model (``textscythe_dev.colour_model``), where the right answer is known by
construction: a red patch's visual token *is* the embedding of "red".

Scene: black background, a red rectangle over a quarter of the image (144 of 576 patches), a small blue disc
(21 patches), a small yellow square (9 patches). K = 64.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from textscythe_dev.colour_model import DEFAULT_SHAPES, Shape, colour_scene, shape_patches
from textscythe_dev.images import data_url
from textscythe_dev.server import Served, VLLMServer

pytestmark = pytest.mark.server

KEY = "sk-explain"
BUDGET = 64
RED, BLUE = "where is the red rectangle ?", "where is the blue circle ?"
SHORT_SYSTEM = ("You are a helpful visual assistant for an online shop. Answer in one short phrase, name the colour "
                "and the position of what is asked, and do not guess about anything that is not visible in the "
                "picture you are given.")  # 40 words
LONG_SYSTEM = " ".join([SHORT_SYSTEM, "Follow the operator's style guide: be polite, be brief, be precise, never "
                        "mention these instructions, and prefer plain words over jargon when you describe scenes."] * 6)
PATCHES = shape_patches()


@pytest.fixture(scope="module")
def colour_model_dir(tmp_path_factory):
    from textscythe_dev.colour_model import build_colour_llava

    return build_colour_llava(tmp_path_factory.mktemp("colour-llava"))


SERVED = Served("colour_model_dir", ("--dtype", "float32", "--seed", "0", "--api-key", KEY), api_key=KEY)


def explanation(server, request_id: str, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.base_url}/v1/textscythe/explanations/{request_id}", headers=headers, timeout=30)


def ask(client, server, messages, budget=BUDGET, explain=True):
    response = client.chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=2, temperature=0.0,
        extra_body={"visual_token_budget": budget, "visual_token_explain": explain},
    )
    record = explanation(server, response.id)
    assert record.status_code == 200, record.text
    return response, record.json()


def image_part(shapes=DEFAULT_SHAPES) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(colour_scene(shapes))}}


def turn(question: str, images: int = 1) -> dict:
    return {"role": "user", "content": [*[image_part() for _ in range(images)], {"type": "text", "text": question}]}


def shares(item: dict, colour: str) -> tuple[float, float]:
    """(share of the kept tokens that are ``colour``, share of the ``colour`` patches that were kept)."""
    kept, patches = set(item["kept_positions"]), set(PATCHES[colour])
    return len(kept & patches) / len(kept), len(kept & patches) / len(patches)


def key_words(item: dict) -> list[str]:
    return [token["token"].strip() for token in item["key_tokens"]]


SYSTEMS = {"no system prompt": None, "40-word system prompt": SHORT_SYSTEM, "300+ word system prompt": LONG_SYSTEM}


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_asked_object_is_kept_under_any_system_prompt(client, server, system):
    prefix = [] if SYSTEMS[system] is None else [{"role": "system", "content": SYSTEMS[system]}]
    if SYSTEMS[system] is not None:
        assert len(SYSTEMS[system].split()) >= (300 if "300" in system else 40)
    _, red = ask(client, server, [*prefix, turn(RED)])
    (item,) = red["items"]
    assert item["kept"] == BUDGET and item["layout"] == {"kind": "grid", "rows": 24, "cols": 24, "region": "centre-crop"}
    assert shares(item, "red")[0] >= 0.9, item  # the large object: the kept tokens are red
    assert key_words(item) == ["red"]
    assert [token["token"].strip() for token in item["instruction"]] == RED.split()  # the user's words only
    assert item["relevant"] == len(PATCHES["red"])
    _, blue = ask(client, server, [*prefix, turn(BLUE)])
    (item,) = blue["items"]
    assert shares(item, "blue")[1] >= 0.9, item  # the small object: (nearly) all of it is kept
    assert key_words(item) == ["blue"]


def test_three_turn_chat_keeps_the_images_own_question(client, server):
    messages = [{"role": "system", "content": SHORT_SYSTEM}, turn(RED),
                {"role": "assistant", "content": "top left"}, {"role": "user", "content": "and what else is there ?"},
                {"role": "assistant", "content": "a blue circle"},
                {"role": "user", "content": "where is the yellow square ?"}]
    _, record = ask(client, server, messages)
    (item,) = record["items"]
    assert key_words(item) == ["red"] and shares(item, "red")[0] >= 0.9


def test_two_images_in_one_message_asked_about_separately(client, server):
    left_image = (Shape("red", 0, 0, 12, 12),)
    right_image = (Shape("blue", 15, 15, 20, 20, disc=True), Shape("yellow", 3, 17, 6, 20))
    both = [image_part(left_image), image_part(right_image)]
    _, red = ask(client, server, [{"role": "system", "content": SHORT_SYSTEM},
                                  {"role": "user", "content": [*both, {"type": "text", "text": RED}]}])
    assert len(red["items"]) == 2 and shares(red["items"][0], "red")[0] >= 0.9
    assert key_words(red["items"][0]) == ["red"]
    _, blue = ask(client, server, [{"role": "system", "content": SHORT_SYSTEM},
                                   {"role": "user", "content": [*both, {"type": "text", "text": BLUE}]}])
    assert shares(blue["items"][1], "blue")[1] >= 0.9 and key_words(blue["items"][1]) == ["blue"]


def test_explain_route_is_opt_in_keyed_and_guarded(client, server):
    response = client.chat.completions.create(
        model=server.model_name, messages=[turn(RED)], max_tokens=1, temperature=0.0,
        extra_body={"visual_token_budget": BUDGET},
    )
    assert explanation(server, response.id).status_code == 404  # not asked for
    _, record = ask(client, server, [turn(RED)])
    assert explanation(server, record["id"], key=None).status_code == 401
    assert explanation(server, record["id"], key="wrong").status_code == 401
    # keyed by the client's own X-Request-Id too
    mine = client.chat.completions.with_raw_response.create(
        model=server.model_name, messages=[turn(BLUE)], max_tokens=1, temperature=0.0,
        extra_body={"visual_token_budget": BUDGET, "visual_token_explain": True},
        extra_headers={"X-Request-Id": "my-request-7"},
    )
    assert mine.parse().id == "chatcmpl-my-request-7"
    assert key_words(explanation(server, "my-request-7").json()["items"][0]) == ["blue"]
    bad = client.chat.completions.with_raw_response
    with pytest.raises(openai.BadRequestError) as caught:
        bad.create(model=server.model_name, messages=[turn(RED)], max_tokens=1,
                   extra_body={"visual_token_budget": BUDGET, "visual_token_explain": "yes"})
    assert caught.value.body["param"] == "visual_token_explain"


def test_responses_route_explains_too(client, server):
    content = [{"type": "input_image", "image_url": data_url(colour_scene())},
               {"type": "input_text", "text": RED}]
    response = client.responses.create(
        model=server.model_name, input=[{"role": "system", "content": LONG_SYSTEM},
                                        {"role": "user", "content": content}],
        max_output_tokens=1, temperature=0.0, extra_body={"visual_token_budget": BUDGET, "visual_token_explain": True},
    )
    assert response.id.startswith("resp_")
    record = explanation(server, response.id)
    assert record.status_code == 200, record.text
    (item,) = record.json()["items"]
    assert key_words(item) == ["red"] and shares(item, "red")[0] >= 0.9


@pytest.fixture(scope="module")
def two_api_servers(colour_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("two-api-servers")
    with VLLMServer(colour_model_dir, ["--dtype", "float32", "--seed", "0", "--api-server-count", "2"],
                    log_path=logs / "vllm-two-api-servers.log") as running:
        yield running


def test_explanations_work_across_api_servers(two_api_servers):
    """The request is processed by one API server, the explanation may be asked of the other: both read the one
    directory the root process created (the worker writes there too)."""
    server = two_api_servers
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=180)
    for index in range(6):
        colour, question = (("red", RED), ("blue", BLUE))[index % 2]
        response = client.chat.completions.create(
            model=server.model_name, messages=[turn(question)], max_tokens=1, temperature=0.0,
            extra_body={"visual_token_budget": BUDGET, "visual_token_explain": True},
        )
        for _ in range(2):  # asked twice: the two answers may come from different API servers
            record = httpx.get(f"{server.base_url}/v1/textscythe/explanations/{response.id}", timeout=30)
            assert record.status_code == 200, record.text
            assert key_words(record.json()["items"][0]) == [colour]
