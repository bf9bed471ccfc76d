"""How kvbm runs vLLM: one set of settings for in-process engines and OpenAI servers.

The values are the ones that work on vLLM's CPU backend (see DESIGN.md): bf16, eager mode,
a block size that is a multiple of 32, a KV cache sized in whole GiB, and no hub access.
Tests build in-process engines from :meth:`EngineSettings.llm_kwargs`; the serve command
starts servers from :meth:`EngineSettings.server_command`; both share :func:`vllm_env`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def vllm_env(kv_cache_gib: int = 1, in_process: bool = False) -> dict[str, str]:
    """Environment variables a vLLM process needs on this backend.

    Args:
        kv_cache_gib: G1 size on the CPU backend, whole GiB (vLLM reads an integer).
        in_process: run the engine core in the calling process (tests: ~4 s start, not 30 s).
            Otherwise it runs in a process of its own, as in production, also when the
            caller itself runs in-process engines (servers must not inherit that).
    """
    if kv_cache_gib < 1:
        raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1, got {kv_cache_gib}")
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1",
    }


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """One vLLM engine's settings.

    Attributes:
        model: directory of a Hugging Face-format model.
        block_size: tokens per KV block; a multiple of 32 on the CPU backend.
        max_model_len: longest prompt plus output, in tokens.
        seed: sampling seed (greedy decoding ignores it, but vLLM wants one).
        num_gpu_blocks_override: caps G1 at this many blocks (to make G1 evict in tests).
        kv_transfer_config: vLLM's KVTransferConfig as a dict, or None for no connector.
        enable_prefix_caching: vLLM's own G1 prefix cache.
        dtype: weights and KV dtype; bfloat16 in production, float32 where tests need
            results that do not depend on batch shape.
        chat_template: a Jinja chat template file for OpenAI servers (the embedded model
            has none, so ``/v1/chat/completions`` needs one); None: the model's own.
        enable_prompt_embeds: accept prompts given as embeddings (vLLM's setting of that
            name; kvbm's connector refuses it).
    """

    model: Path
    block_size: int = 32
    max_model_len: int = 4096
    seed: int = 0
    num_gpu_blocks_override: int | None = None
    kv_transfer_config: dict[str, Any] | None = None
    enable_prefix_caching: bool = True
    dtype: str = "bfloat16"
    chat_template: Path | None = None
    enable_prompt_embeds: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % 32:
            raise ValueError(f"block_size must be a positive multiple of 32 on the CPU backend, got {self.block_size}")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for an in-process ``vllm.LLM``."""
        kwargs: dict[str, Any] = dict(
            model=str(self.model),
            dtype=self.dtype,
            enforce_eager=True,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            seed=self.seed,
            distributed_executor_backend="uni",
            enable_prefix_caching=self.enable_prefix_caching,
        )
        if self.num_gpu_blocks_override is not None:
            kwargs["num_gpu_blocks_override"] = self.num_gpu_blocks_override
        if self.kv_transfer_config is not None:
            kwargs["kv_transfer_config"] = self.kv_transfer_config
        if self.enable_prompt_embeds:
            kwargs["enable_prompt_embeds"] = True
        return kwargs

    def server_command(self, host: str, port: int, served_name: str | None = None) -> list[str]:
        """argv of an OpenAI-compatible vLLM server (the ``vllm`` console script is broken
        on vllm-cpu, so the module is run directly)."""
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--host",
            host,
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--enforce-eager",
            "--block-size",
            str(self.block_size),
            "--max-model-len",
            str(self.max_model_len),
            "--seed",
            str(self.seed),
            "--disable-uvicorn-access-log",
        ]
        if served_name:
            argv += ["--served-model-name", served_name]
        if not self.enable_prefix_caching:
            argv.append("--no-enable-prefix-caching")
        if self.num_gpu_blocks_override is not None:
            argv += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        if self.kv_transfer_config is not None:
            argv += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        if self.chat_template is not None:
            argv += ["--chat-template", str(self.chat_template)]
        if self.enable_prompt_embeds:
            argv.append("--enable-prompt-embeds")
        return argv
