"""kvbm: a hash-addressed KV-cache block manager with tiered offload for LLM serving.

Importing kvbm loads no engine, CUDA or NIXL code; those load when a module that needs them
is first used.
"""

__version__ = "0.1.0"
