"""TextScythe for vLLM: instruction-guided visual token pruning before prefill.

Importing this package is cheap and never imports vLLM; the vLLM integration lives in
:mod:`textscythe_vllm.plugin` and is loaded by vLLM through the ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"
