"""TextScythe for vLLM: instruction-guided visual token pruning before prefill.

Importing this package is cheap and never imports vLLM; the vLLM integration lives in
:mod:`textscythe_vllm.plugin` and is loaded by vLLM through the ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"

#: Name of the plugin's logger: a child of vLLM's ``vllm`` logger, so its records go through vLLM's handlers
#: and format (and ``VLLM_LOGGING_LEVEL``) inside vLLM processes.
LOGGER_NAME = "vllm.textscythe"
