"""What kvbm needs to know about a vLLM engine's KV cache, read from vLLM's configs.

Both connector sides compute these from the same configs, so the scheduler's block manager and
the worker's buffers agree on the block size in bytes without talking to each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbm.hashing import LayoutFingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


class UnsupportedEngineError(ValueError):
    """The engine's KV cache has a shape kvbm does not handle yet."""


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Raises :class:`UnsupportedEngineError` for engines kvbm cannot serve correctly."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise UnsupportedEngineError(
            f"kvbm supports models with one KV cache group (full attention); this one has {len(groups)}")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise UnsupportedEngineError(
            "kvbm supports tensor_parallel_size=1 and pipeline_parallel_size=1 for now, got "
            f"{parallel.tensor_parallel_size} and {parallel.pipeline_parallel_size}")


def block_bytes(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one block across every layer: the size of a G2 slot."""
    group = kv_cache_config.kv_cache_groups[0]
    return group.kv_cache_spec.page_size_bytes * len(group.layer_names)


def layout_fingerprint(vllm_config: VllmConfig, tp_rank: int = 0) -> LayoutFingerprint:
    """Everything that makes this engine's KV bytes differ from another's for the same tokens."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    dtype = str(model.dtype).removeprefix("torch.")
    return LayoutFingerprint(
        model=f"{model.model}@{model.revision or 'local'}",
        dtype=dtype if cache.cache_dtype == "auto" else str(cache.cache_dtype),
        block_size=cache.block_size,
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        layout_tag=f"vllm-{vllm_config.device_config.device_type}",
        tp_rank=tp_rank,
        tp_size=parallel.tensor_parallel_size,
    )
