"""kvbm's vLLM integration (installed as ``kvbm.connectors.vllm``).

Importing this package imports nothing from vLLM; the plugin hook in :mod:`.plugin` runs in
every vLLM process through the ``vllm.general_plugins`` entry point.
"""
