"""The vLLM versions this plugin is tested against, and the one clear error for any other."""

from __future__ import annotations

import os

TESTED_VLLM_SERIES = "0.32"
#: Test hook (tests/test_reliability.py): when set, the version check sees this version instead of the installed
#: one, so the refusal path of a real ``vllm serve`` start-up can be exercised without another vLLM.
VERSION_OVERRIDE_ENV = "TEXTSCYTHE_VLLM_VERSION_OVERRIDE"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    """Refuse to patch a vLLM whose private processor/model APIs we have not tested."""
    version = os.environ.get(VERSION_OVERRIDE_ENV) or version
    release = version.split("+", 1)[0]
    if release.split(".")[:2] != TESTED_VLLM_SERIES.split("."):
        raise UnsupportedVLLMVersion(
            f"textscythe-vllm supports vLLM {TESTED_VLLM_SERIES}.x only (it overrides private multimodal "
            f"processor and model APIs pinned to that series), but vLLM {version} is installed. Install "
            f"'vllm>={TESTED_VLLM_SERIES}.0,<0.{int(TESTED_VLLM_SERIES.split('.')[1]) + 1}', or disable the "
            f"plugin with VLLM_PLUGINS= (empty) to run stock vLLM."
        )


# --- what the API server's app knows (read by the middleware) ----------------------------------------------
def api_key_tokens(app: object) -> list[str]:
    """The API keys vLLM's own ``AuthenticationMiddleware`` was installed with (``--api-key`` or
    ``VLLM_API_KEY``), read from the app's middleware list; ``[]`` when the server has no key."""
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    for middleware in getattr(app, "user_middleware", ()):
        if middleware.cls is AuthenticationMiddleware:
            return [token for token in middleware.kwargs.get("tokens", ()) if token]
    return []


def served_model(app: object) -> tuple[str, str] | None:
    """``(served model name, architecture vLLM resolved)`` of the API server's app, or ``None`` before the app's
    state is set up. The architecture is the *resolved* one: ``--model-impl transformers`` reports the
    Transformers backend class, not the checkpoint's architecture."""
    config = getattr(getattr(app, "state", None), "vllm_config", None)
    if config is None:
        return None
    model_config = config.model_config
    return str(model_config.served_model_name), str(model_config.architecture)
