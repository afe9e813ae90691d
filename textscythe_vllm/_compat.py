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
