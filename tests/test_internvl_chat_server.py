"""The tests of ``tests/test_internvl_server.py`` on the chat format (``InternVLChatModel``, vLLM's ``internvl.py``
and its own processor; ``--trust-remote-code`` loads the checkpoint's config classes from its directory): the
same saved random weights, renamed, served by a real ``vllm serve`` with the plugin and compared with a stock
``vllm serve``. Each test runs against this module's server (``SERVED``, ``model_dir``)."""

from __future__ import annotations

import pytest
from test_internvl_server import (  # noqa: F401 - collected here, against this module's server
    SERVER_ARGS,
    test_bad_values_are_400,
    test_every_selector,
    test_image_budget_counts_tiles_and_thumbnail,
    test_metrics_count_image_and_video_tokens_before_and_after,
    test_no_budget_is_stock_vllm_token_for_token,
    test_two_images_and_a_video_budget_per_item,
    test_video_budget_is_spread_over_frames,
)

from textscythe_dev import tiny_internvl
from textscythe_dev.server import Served

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_internvl.build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl-chat"), fmt="chat",
                                            with_weights=True)


SERVED = Served("model_dir", (*SERVER_ARGS, "--trust-remote-code"), name="tiny-internvl-chat",
                env_fixture="selection_env", timeout=300)
