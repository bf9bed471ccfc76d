"""What kvbm reads from vLLM's configs: engines it refuses, the layout fingerprint, request extras.

The unit tests build vLLM's own KV cache spec classes and small stand-ins for the configs;
the fingerprint tests build real ``VllmConfig`` objects (no engine); the engine tests come last
(only the newest in-process engine works, see conftest), the one that must fail to start last.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.lora.request import LoRARequest
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from conftest import greedy
from kvbm.connectors.vllm.engine_layout import (
    UnsupportedEngineError,
    check_supported,
    directory_digest,
    layout_fingerprint,
    weights_identity,
)
from kvbm.connectors.vllm.request_extras import block_extras
from kvbm.errors import ConfigError
from kvbm.hashing import BlockHasher, LayoutFingerprint
from kvbm.serving.embedded_model import ensure_model
from kvbm.serving.vllm_settings import EngineSettings

BLOCK = 32
SPEC = dict(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)


def make_vllm_config(prompt_embeds: bool = False, **parallel: int) -> SimpleNamespace:
    sizes = dict(
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        decode_context_parallel_size=1,
        prefill_context_parallel_size=1,
    )
    sizes.update(parallel)
    return SimpleNamespace(
        model_config=SimpleNamespace(enable_prompt_embeds=prompt_embeds), parallel_config=SimpleNamespace(**sizes)
    )


def make_kv_cache_config(*specs) -> KVCacheConfig:
    groups = [KVCacheGroupSpec([f"model.layers.{i}.attn"], spec) for i, spec in enumerate(specs)]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)


# -- check_supported ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [FullAttentionSpec(**SPEC), FullAttentionSpec(**SPEC, sliding_window=128)],
    ids=["full", "full-recording-a-window"],
)
def test_full_attention_is_served(spec) -> None:
    check_supported(make_vllm_config(), make_kv_cache_config(spec))


@pytest.mark.parametrize(
    "spec, match",
    [
        (SlidingWindowSpec(**SPEC, sliding_window=128), r"SlidingWindowSpec \(sliding_window=128\)"),
        (ChunkedLocalAttentionSpec(**SPEC, attention_chunk_size=256), r"attention_chunk_size=256"),
        (MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16), "MLAAttentionSpec"),
        (FullAttentionSpec(**SPEC, non_causal=True), "non_causal"),
    ],
    ids=["sliding-window", "chunked-local", "mla", "non-causal"],
)
def test_other_attention_is_refused_naming_it(spec, match) -> None:
    with pytest.raises(UnsupportedEngineError, match=match):
        check_supported(make_vllm_config(), make_kv_cache_config(spec))


def test_prompt_embeds_are_refused_naming_the_setting() -> None:
    with pytest.raises(UnsupportedEngineError, match="enable_prompt_embeds"):
        check_supported(make_vllm_config(prompt_embeds=True), make_kv_cache_config(FullAttentionSpec(**SPEC)))


@pytest.mark.parametrize(
    "parallel",
    ["tensor_parallel_size", "pipeline_parallel_size", "decode_context_parallel_size", "prefill_context_parallel_size"],
)
def test_parallelism_is_refused_naming_the_setting(parallel) -> None:
    with pytest.raises(UnsupportedEngineError, match=f"{parallel}=2"):
        check_supported(make_vllm_config(**{parallel: 2}), make_kv_cache_config(FullAttentionSpec(**SPEC)))


def test_two_groups_are_refused() -> None:
    spec = FullAttentionSpec(**SPEC)
    with pytest.raises(UnsupportedEngineError, match="one KV cache group"):
        check_supported(make_vllm_config(), make_kv_cache_config(spec, spec))


# -- layout fingerprint ------------------------------------------------------------------------


def vllm_config_of(model: Path, **engine_args):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**{**EngineSettings(model=model).llm_kwargs(), **engine_args}).create_engine_config()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """The tiny model's architecture and config with other weights (another seed)."""
    return ensure_model("tiny", seed=1, cache_dir=tmp_path_factory.mktemp("models"))


def test_rewritten_weights_at_the_same_path_change_the_fingerprint(tiny_model, other_weights, tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert (other_weights / "config.json").read_bytes() == (model / "config.json").read_bytes()
    before = layout_fingerprint(vllm_config_of(model))
    shutil.copyfile(other_weights / "model.safetensors", model / "model.safetensors")
    after = layout_fingerprint(vllm_config_of(model))
    assert before.model == after.model  # the path alone names both
    assert before.weights != after.weights and before.digest() != after.digest()


def test_the_weights_identity_travels_with_a_copy(tiny_model, tmp_path) -> None:
    """Peers and restarted workers with the same files elsewhere share blocks."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, copy)
    assert directory_digest(copy) == directory_digest(tiny_model)
    assert directory_digest(copy).startswith("xxh3:")


def test_large_weight_files_are_sampled_not_read_whole(tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1 << 20], "data_offsets": [0, 2 << 20]}}).encode()
    weights = bytearray(len(header).to_bytes(8, "little") + header + bytes(2 << 20))
    (model / "model.safetensors").write_bytes(weights)
    base = directory_digest(model)
    weights[-1] ^= 1  # the last sample covers the file's end
    (model / "model.safetensors").write_bytes(weights)
    assert directory_digest(model) != base
    (model / "config.json").write_text('{"hidden_size": 9}')  # small files count whole
    assert len({base, directory_digest(model)}) == 2


def test_a_hub_name_not_cached_here_is_named_by_its_revision() -> None:
    assert weights_identity("no-such-org/no-such-model", "abc123") == "no-such-org/no-such-model@abc123"
    assert weights_identity("no-such-org/no-such-model", None) == "no-such-org/no-such-model@unpinned"


@pytest.mark.parametrize(
    "engine_args, field, value",
    [
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype", "fp8"),
        (dict(hf_overrides={"rope_theta": 5000.0}), "hf_overrides", '{"rope_theta":5000.0}'),
        (dict(attention_backend="CPU_ATTN"), "attention_backend", "CPU_ATTN"),
    ],
    ids=["kv-cache-dtype", "hf-overrides", "attention-backend"],
)
def test_engine_settings_that_change_kv_bytes_change_the_fingerprint(tiny_model, engine_args, field, value) -> None:
    plain = layout_fingerprint(vllm_config_of(tiny_model))
    changed = layout_fingerprint(vllm_config_of(tiny_model, **engine_args))
    assert getattr(changed, field) == value != getattr(plain, field)
    assert changed.dtype == plain.dtype == "bfloat16"  # the model dtype is kept beside the KV dtype
    assert changed.digest() != plain.digest()


def test_quantization_is_in_the_fingerprint(tiny_model) -> None:
    """The tiny model has no quantized checkpoint: the method is set on its built config."""
    config = vllm_config_of(tiny_model)
    plain = layout_fingerprint(config)
    config.model_config.quantization = "fp8"
    quantized = layout_fingerprint(config)
    assert plain.quantization is None and quantized.quantization == "fp8"
    assert quantized.digest() != plain.digest()


# -- request extras ----------------------------------------------------------------------------


def make_request(lora: LoRARequest | None = None, salt: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(lora_request=lora, cache_salt=salt, mm_features=None)


def first_hashes(request, first_block: int = 0) -> tuple:
    hasher = BlockHasher(LayoutFingerprint("m", "bfloat16", BLOCK, 2, 2, 32, "test"))
    tokens = np.arange(3 * BLOCK, dtype=np.int32)
    return hasher.hash_prompt(tokens, extras=block_extras(request, BLOCK, first_block)).hashes


def test_lora_is_keyed_by_adapter_name_and_path_not_vllms_int_id() -> None:
    a1 = make_request(LoRARequest("sql", 1, "/adapters/sql"))
    a7 = make_request(LoRARequest("sql", 7, "/adapters/sql"))  # another process's id, same adapter
    other_path = make_request(LoRARequest("sql", 1, "/adapters/sql-v2"))
    other_name = make_request(LoRARequest("chat", 1, "/adapters/sql"))
    assert first_hashes(a1) == first_hashes(a7)
    assert len({first_hashes(r)[0] for r in (a1, other_path, other_name, make_request())}) == 4


def test_lora_and_salt_enter_only_the_first_block() -> None:
    request = make_request(LoRARequest("sql", 1, "/adapters/sql"), salt="tenant")
    extras = block_extras(request, BLOCK, 0)
    assert list(extras) == [0] and extras[0].cache_salt == "tenant" and extras[0].lora is not None
    assert block_extras(request, BLOCK, 1) == {}


# -- in engines --------------------------------------------------------------------------------


def kvbm_config(**extra) -> dict:
    return {
        "kv_connector": "KVBMConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"g2_capacity_blocks": 64, **extra},
    }


def test_an_engine_serves_its_full_fingerprint_and_recomputes_failed_loads(make_engine, tiny_model, tmp_path, caplog):
    """Scheduler and worker agree on the fingerprint (both open one G3 directory with it), it
    names the resolved KV layout and the weights, and the router can rebuild it from /layout.
    vLLM's default "fail" policy becomes "recompute", saying how to choose "fail"."""
    caplog.set_level(logging.INFO, logger="kvbm.connectors.vllm.connector")
    llm = make_engine(
        EngineSettings(
            model=tiny_model,
            num_gpu_blocks_override=64,
            max_model_len=1024,
            kv_transfer_config=kvbm_config(stats_port=0, g3_dir=str(tmp_path / "g3"), g3_capacity_bytes="16MiB"),
        )
    )
    assert len(llm.generate(["The quick brown fox " * 20], greedy(4))[0].outputs[0].token_ids) == 4
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    with urllib.request.urlopen(f"http://127.0.0.1:{connector.stats_port}/layout", timeout=10) as response:
        fingerprint = LayoutFingerprint(**json.load(response))
    assert fingerprint.layout_tag.startswith("vllm-cpu-") and "unresolved" not in fingerprint.layout_tag
    assert fingerprint.weights == directory_digest(tiny_model)
    assert llm.llm_engine.vllm_config.kv_transfer_config.kv_load_failure_policy == "recompute"
    assert "load_failure='fail'" in caplog.text


def test_kvbm_fail_against_vllms_recompute_stops_the_engine_naming_both(make_engine, tiny_model):
    transfer = {**kvbm_config(load_failure="fail"), "kv_load_failure_policy": "recompute"}
    settings = EngineSettings(
        model=tiny_model, num_gpu_blocks_override=64, max_model_len=1024, kv_transfer_config=transfer
    )
    with pytest.raises(ConfigError, match="'load_failure'.*kv_load_failure_policy"):
        make_engine(settings)


def test_an_engine_with_prompt_embeds_is_refused_naming_the_setting(make_engine, tiny_model):
    settings = EngineSettings(
        model=tiny_model,
        num_gpu_blocks_override=64,
        max_model_len=1024,
        enable_prompt_embeds=True,
        kv_transfer_config=kvbm_config(),
    )
    with pytest.raises(UnsupportedEngineError, match="enable_prompt_embeds"):
        make_engine(settings)
