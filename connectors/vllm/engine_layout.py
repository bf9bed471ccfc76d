"""What kvbm needs to know about a vLLM engine's KV cache, read from vLLM's configs.

Both connector sides compute these from the same configs, so the scheduler's block manager and
the worker's buffers agree on the block size in bytes without talking to each other, and
both sides (and the router, from the worker's ``/layout``) hash blocks under one fingerprint.

:func:`check_supported` refuses, at start-up, engines whose KV kvbm would cache or serve
wrongly; :func:`layout_fingerprint` names everything that makes one engine's KV bytes for
some tokens differ from another's, including the weights' own identity (:func:`weights_identity`),
since a path or a hub name alone can name another model tomorrow.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvbm.hashing import LayoutFingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.attention import AttentionConfig
    from vllm.config.cache import CacheConfig
    from vllm.config.model import ModelConfig
    from vllm.config.parallel import ParallelConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# Weights identity: files up to _WHOLE_FILE_BYTES are hashed whole (config.json and the other
# small files); larger ones by name, size, a safetensors header and _SAMPLES evenly spaced
# reads of _SAMPLE_BYTES, so a many-GiB checkpoint costs a few hundred KiB of reads.
_WHOLE_FILE_BYTES = 64 << 10
_SAMPLE_BYTES = 4 << 10
_SAMPLES = 16
_SAFETENSORS_HEADER_MAX = 100 << 20  # the format's own limit on its JSON header


class UnsupportedEngineError(ValueError):
    """The engine's KV cache has a shape kvbm does not handle yet."""


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse, naming the setting, engines kvbm cannot serve correctly.

    Raises:
        UnsupportedEngineError: prompt embeddings are enabled, the model has more than one
            KV cache group or one that is not plain full attention (sliding window, chunked
            local, non-causal, MLA, Mamba...), or it runs with tensor, pipeline or context
            parallelism.
    """
    _check_prompt_inputs(vllm_config.model_config)
    _check_kv_cache_groups(kv_cache_config)
    _check_parallel(vllm_config.parallel_config)


def _check_prompt_inputs(model: ModelConfig) -> None:
    if model.enable_prompt_embeds:
        # vLLM gives an embedded prompt token id 0 at every position: kvbm, which names blocks
        # by token ids, would hand one request's KV to another with different embeddings.
        raise UnsupportedEngineError(
            "kvbm cannot serve requests with prompt embeddings (enable_prompt_embeds=True): it "
            "names KV blocks by token ids, and an embedded prompt has none; start vLLM without "
            "--enable-prompt-embeds, or without the kvbm connector"
        )


def _check_kv_cache_groups(kv_cache_config: KVCacheConfig) -> None:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise UnsupportedEngineError(
            f"kvbm supports models with one KV cache group (full attention); this one has {len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    # The exact type, not isinstance: subclasses (MLA, RSWA) lay blocks out differently, and
    # sliding-window or chunked-local specs let vLLM drop blocks kvbm would store as a prefix.
    # A FullAttentionSpec that records a sliding window (the hybrid allocator off) keeps every
    # token's KV, so its blocks are whole prefixes like any other.
    if type(spec) is not FullAttentionSpec:
        raise UnsupportedEngineError(
            "kvbm supports full-attention KV caches only (kv_cache_spec FullAttentionSpec); this "
            f"model's is {_describe_spec(spec)}: vLLM frees or lays out its blocks in ways kvbm "
            "would cache or serve wrongly"
        )
    if spec.non_causal:
        raise UnsupportedEngineError(
            "kvbm cannot cache non-causal attention (kv_cache_spec non_causal=True): a block's KV "
            "depends on the tokens after it, so it is no reusable prefix"
        )


def _describe_spec(spec: Any) -> str:
    settings = [
        f"{name}={getattr(spec, name)}"
        for name in ("sliding_window", "attention_chunk_size")
        if getattr(spec, name, None) is not None
    ]
    return type(spec).__name__ + (f" ({', '.join(settings)})" if settings else "")


def _check_parallel(parallel: ParallelConfig) -> None:
    sizes = {
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
        "decode_context_parallel_size": parallel.decode_context_parallel_size,
        "prefill_context_parallel_size": parallel.prefill_context_parallel_size,
    }
    wrong = {name: size for name, size in sizes.items() if size != 1}
    if wrong:
        got = ", ".join(f"{name}={size}" for name, size in wrong.items())
        raise UnsupportedEngineError(f"kvbm supports one rank without parallelism for now (each size 1), got {got}")


def block_bytes(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one block across every layer: the size of a G2 slot."""
    group = kv_cache_config.kv_cache_groups[0]
    return group.kv_cache_spec.page_size_bytes * len(group.layer_names)


def layout_fingerprint(vllm_config: VllmConfig, tp_rank: int = 0) -> LayoutFingerprint:
    """Everything that makes this engine's KV bytes differ from another's for the same tokens.

    Reads the model's files (see :func:`weights_identity`): call it once, at start-up.

    Raises:
        OSError: a file of the model directory cannot be read.
    """
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    name = f"{model.model}@{model.revision or 'local'}"
    if model.hf_config_path:
        name += f" config={model.hf_config_path}"
    return LayoutFingerprint(
        model=name,
        dtype=str(model.dtype).removeprefix("torch."),
        block_size=cache.block_size,
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        # The physical KV layout vLLM resolved (engine core and workers alike) before any
        # connector is built; "unresolved" only for configs built outside an engine.
        layout_tag=f"vllm-{vllm_config.device_config.device_type}-{cache.kv_cache_layout or 'unresolved'}",
        weights=weights_identity(model.model, model.revision, vllm_config.load_config.download_dir),
        quantization=_quantization(model),
        kv_cache_dtype=_kv_cache_dtype(cache),
        attention_backend=_attention_backend(vllm_config.attention_config),
        hf_overrides=_hf_overrides(model.hf_overrides),
        tp_rank=tp_rank,
        tp_size=parallel.tensor_parallel_size,
    )


def _quantization(model: ModelConfig) -> str | None:
    if not model.quantization and not model.quantization_config:
        return None
    text = str(model.quantization or "online")
    if model.quantization_config:
        text += " " + _canonical(model.quantization_config)
    return text


def _kv_cache_dtype(cache: CacheConfig) -> str:
    text = str(cache.cache_dtype)
    if cache.kv_cache_dtype_skip_layers:  # those layers keep the model dtype
        text += " skip=" + ",".join(map(str, cache.kv_cache_dtype_skip_layers))
    return text


def _attention_backend(attention: AttentionConfig) -> str | None:
    """The backend the user chose (vLLM records no automatic choice in its configs; the device
    and the resolved KV layout in ``layout_tag`` stand for it)."""
    parts = [attention.backend.name] if attention.backend is not None else []
    parts += [f"{kind}={backend.name}" for kind, backend in sorted(attention.backend_per_kind.items())]
    return " ".join(parts) or None


def _hf_overrides(overrides: Any) -> str | None:
    if callable(overrides):
        # A function's effect cannot be read; its name is the best identity there is.
        return f"callable {getattr(overrides, '__module__', '?')}.{getattr(overrides, '__qualname__', repr(overrides))}"
    return _canonical(overrides) if overrides else None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.name
    return repr(value)


def weights_identity(model: str, revision: str | None, download_dir: str | None = None) -> str:
    """Identity of the weights vLLM serves as ``model``, the same wherever they are copied.

    A local directory (or single file, e.g. GGUF) is named by :func:`directory_digest`; a hub
    name by ``name@revision`` plus the digest of its local snapshot when the hub cache
    holds one (an unpinned name follows ``main``, which moves).

    Raises:
        OSError: a file of the local model cannot be read.
    """
    path = Path(model)
    if path.exists():
        return directory_digest(path)
    pinned = f"{model}@{revision or 'unpinned'}"
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True)
    except (OSError, ValueError, ImportError):  # not cached here, or not a hub name at all
        return pinned
    return f"{pinned} {directory_digest(Path(snapshot))}"


def directory_digest(path: Path) -> str:
    """xxh3-128 over every file under ``path`` (hidden names skipped): its relative name, size
    and contents, whole for small files, sampled for large ones (see the module constants).

    Raises:
        OSError: a file cannot be read.
    """
    digest = xxhash.xxh3_128()
    root = path if path.is_dir() else path.parent
    for file in _model_files(path):
        name = file.relative_to(root).as_posix().encode()
        size = file.stat().st_size
        digest.update(struct.pack("<I", len(name)) + name + struct.pack("<Q", size))
        with open(file, "rb") as f:
            for chunk in _file_samples(f.fileno(), size, file.suffix == ".safetensors"):
                digest.update(chunk)
    return "xxh3:" + digest.hexdigest()


def _model_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache: not the model
        files += [Path(folder, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    return sorted(files)


def _file_samples(fd: int, size: int, safetensors: bool) -> list[bytes]:
    if size <= _WHOLE_FILE_BYTES:
        return [os.pread(fd, size, 0)]
    chunks = []
    if safetensors:
        # Tensor names, dtypes, shapes and offsets: a re-saved checkpoint with another
        # structure differs here even where the samples happen to agree.
        (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if header_len <= min(_SAFETENSORS_HEADER_MAX, size - 8):
            chunks.append(os.pread(fd, header_len, 8))
    step = (size - _SAMPLE_BYTES) / (_SAMPLES - 1)
    chunks += [os.pread(fd, _SAMPLE_BYTES, round(i * step)) for i in range(_SAMPLES)]
    return chunks
