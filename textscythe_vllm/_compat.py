"""The vLLM versions this plugin is tested against, and the one clear error for any other."""

from __future__ import annotations

import os

#: The vLLM minor series whose private multimodal processor and model APIs the plugin is written against: 0.32 is
#: tested on CPU in CI; every module the plugin subclasses is byte-identical in 0.33.0 (no CPU wheel of 0.33 exists
#: to run it; docs/operations.md, "vLLM versions").
SUPPORTED_VLLM_SERIES = ("0.32", "0.33")
#: Test hook (tests/test_reliability.py): when set, the version check sees this version instead of the installed
#: one, so the refusal path of a real ``vllm serve`` start-up can be exercised without another vLLM.
VERSION_OVERRIDE_ENV = "TEXTSCYTHE_VLLM_VERSION_OVERRIDE"
#: The pip requirement that matches :data:`SUPPORTED_VLLM_SERIES` (also in pyproject.toml).
VLLM_REQUIREMENT = "vllm>=0.32,<0.34"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    """Refuse to patch a vLLM whose private processor/model APIs the plugin was not written against."""
    version = os.environ.get(VERSION_OVERRIDE_ENV) or version
    release = version.split("+", 1)[0]
    if ".".join(release.split(".")[:2]) not in SUPPORTED_VLLM_SERIES:
        series = " and ".join(f"{minor}.x" for minor in SUPPORTED_VLLM_SERIES)
        raise UnsupportedVLLMVersion(
            f"textscythe-vllm supports vLLM {series} only (it overrides private multimodal processor and model "
            f"APIs of those series), but vLLM {version} is installed. Install '{VLLM_REQUIREMENT}', or disable "
            f"the plugin with VLLM_PLUGINS= (empty) to run stock vLLM."
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
