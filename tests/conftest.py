from __future__ import annotations

from pathlib import Path

import pytest

from textscythe_dev.server import Served, VLLMServer


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-1.5-shaped tiny checkpoint (config/tokenizer/processor only: serve with --load-format dummy)."""
    from textscythe_dev.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-1.5"), kind="llava-1.5")


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textscythe_dev.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-next"), kind="llava-next")


@pytest.fixture(scope="session")
def tiny_llava_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-1.5-shaped tiny checkpoint with real (random, seeded) weights, for HF-vs-vLLM equivalence."""
    from textscythe_dev.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-1.5-weights"), kind="llava-1.5", with_weights=True)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The real ``vllm serve`` (with the plugin) a server test module declares as ``SERVED = Served(...)``."""
    spec: Served = request.module.SERVED
    env = request.getfixturevalue(spec.env_fixture) if spec.env_fixture else None
    log = tmp_path_factory.mktemp("logs") / f"vllm-{spec.name}.log"
    with VLLMServer(request.getfixturevalue(spec.model), spec.args, env=env, log_path=log,
                    served_model_name=spec.name) as running:
        yield running


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest, server: VLLMServer):
    """The ``openai`` SDK pointed at the module's server (no retries: a failure is the server's answer)."""
    import openai

    spec: Served = request.module.SERVED
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=spec.api_key, max_retries=0, timeout=spec.timeout)


@pytest.fixture(scope="session")
def clip() -> str:
    """An mp4 data URL: 8 frames of 168 x 112 px at 2 fps (Qwen: 4 temporal patches)."""
    from textscythe_dev.images import video_data_url

    return video_data_url(2)


@pytest.fixture(scope="module")
def selection_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the module's server appends every selection it runs (``$TEXTSCYTHE_SELECTION_LOG``, JSON lines)."""
    return tmp_path_factory.mktemp("selections") / "selections.jsonl"


@pytest.fixture(scope="module")
def selection_env(selection_log: Path) -> dict[str, str]:
    """The server environment that writes :func:`selection_log` (``Served(..., env_fixture="selection_env")``)."""
    from textscythe_vllm.pruning import SELECTION_LOG_ENV

    return {SELECTION_LOG_ENV: str(selection_log)}
