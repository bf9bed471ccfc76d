"""Config: built from a plain dict, validated once, every error names its field."""

from __future__ import annotations

import dataclasses

import pytest

from kvbm.config import G3OnMismatch, KvbmConfig
from kvbm.connectors.vllm.config import ConnectorConfig, LoadFailurePolicy, resolve_load_failure
from kvbm.errors import ConfigError
from kvbm.manager.block_manager import BlockManager
from kvbm.manager.policy import OffloadPolicy


def test_defaults_and_round_trip() -> None:
    cfg = KvbmConfig.from_dict({"g2_capacity_bytes": "1GiB"})
    assert cfg.g2_capacity_bytes == 1 << 30
    assert cfg.g2_capacity_blocks is None
    assert cfg.offload_policy is OffloadPolicy.WRITE_THROUGH
    assert cfg.offload_min_hits == 0
    assert KvbmConfig.from_dict(cfg.to_dict()) == cfg


def test_every_field_from_a_dict() -> None:
    raw = {
        "g2_capacity_blocks": 128,
        "offload_policy": "on_eviction",
        "offload_min_hits": 2,
        "verify_g2_reads": True,
        "transfer_thread": False,
        "latency_window": 16,
        "event_buffer": 0,
        "cuda_staging_bytes": "8MiB",
        "g3_dir": "/var/tmp/kvbm",
        "g3_capacity_bytes": "10GB",
        "g3_on_mismatch": "wipe",
        "g3_direct_io": False,
        "g3_io_threads": 2,
    }
    cfg = KvbmConfig.from_dict(raw)
    assert cfg.offload_policy is OffloadPolicy.ON_EVICTION
    assert cfg.cuda_staging_bytes == 8 << 20
    assert cfg.g3_capacity_bytes == 10**10
    assert cfg.g3_on_mismatch is G3OnMismatch.WIPE
    assert cfg.to_dict() == {
        **raw,
        "cuda_staging_bytes": 8 << 20,
        "g3_capacity_bytes": 10**10,
        "g2_capacity_bytes": None,
    }


@pytest.mark.parametrize(
    "text, expected",
    [("4096", 4096), ("512MB", 512 * 10**6), ("1.5KiB", 1536), ("2 gib", 2 << 30), ("7B", 7), (1 << 20, 1 << 20)],
)
def test_sizes(text, expected) -> None:
    assert KvbmConfig.from_dict({"g2_capacity_bytes": text}).g2_capacity_bytes == expected


@pytest.mark.parametrize(
    "raw, field, match",
    [
        ({"g2_capacity_blocks": 4, "g2_capacity_byte": 4}, "g2_capacity_byte", "unknown key"),
        ({}, "g2_capacity_bytes", "exactly one"),
        ({"g2_capacity_blocks": 4, "g2_capacity_bytes": 4096}, "g2_capacity_bytes", "exactly one"),
        ({"g2_capacity_blocks": 0}, "g2_capacity_blocks", ">= 1"),
        ({"g2_capacity_blocks": -3}, "g2_capacity_blocks", ">= 1"),
        ({"g2_capacity_bytes": 0}, "g2_capacity_bytes", ">= 1"),
        ({"g2_capacity_bytes": "-1GiB"}, "g2_capacity_bytes", "expected bytes"),
        ({"g2_capacity_bytes": "lots"}, "g2_capacity_bytes", "expected bytes"),
        ({"g2_capacity_bytes": True}, "g2_capacity_bytes", "expected a size"),
        ({"g2_capacity_blocks": 4.0}, "g2_capacity_blocks", "expected an int"),
        ({"g2_capacity_blocks": 4, "offload_policy": "lru"}, "offload_policy", "write_through, on_eviction"),
        ({"g2_capacity_blocks": 4, "offload_policy": 1}, "offload_policy", "unknown policy"),
        ({"g2_capacity_blocks": 4, "offload_min_hits": -1}, "offload_min_hits", ">= 0"),
        ({"g2_capacity_blocks": 4, "offload_min_hits": "2"}, "offload_min_hits", "expected an int"),
        ({"g2_capacity_blocks": 4, "verify_g2_reads": "yes"}, "verify_g2_reads", "bool"),
        ({"g2_capacity_blocks": 4, "transfer_thread": 1}, "transfer_thread", "bool"),
        ({"g2_capacity_blocks": 4, "latency_window": 0}, "latency_window", ">= 1"),
        ({"g2_capacity_blocks": 4, "event_buffer": -1}, "event_buffer", ">= 0"),
        ({"g2_capacity_blocks": 4, "g3_dir": "/tmp/x"}, "g3_dir", "together"),
        ({"g2_capacity_blocks": 4, "g3_capacity_bytes": "1GiB"}, "g3_dir", "together"),
        ({"g2_capacity_blocks": 4, "g3_dir": "", "g3_capacity_bytes": 1}, "g3_dir", "non-empty"),
        ({"g2_capacity_blocks": 4, "g3_on_mismatch": "delete"}, "g3_on_mismatch", "refuse, wipe"),
        ({"g2_capacity_blocks": 4, "g3_direct_io": "no"}, "g3_direct_io", "bool"),
        ({"g2_capacity_blocks": 4, "g3_io_threads": 0}, "g3_io_threads", ">= 1"),
        ({"g2_capacity_blocks": 4, "g3_io_threads": 65}, "g3_io_threads", "<= 64"),
    ],
)
def test_bad_config_names_the_field(raw, field, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        KvbmConfig.from_dict(raw)
    assert info.value.field == field
    assert repr(field) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="offload_policy"):
        KvbmConfig(g2_capacity_blocks=4, offload_policy="write_through")  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    cfg = KvbmConfig(g2_capacity_blocks=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.g2_capacity_blocks = 8  # type: ignore[misc]


def test_non_mapping_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="mapping"):
        KvbmConfig.from_dict([("g2_capacity_blocks", 4)])  # type: ignore[arg-type]


def test_g2_slots_from_bytes_or_blocks() -> None:
    assert KvbmConfig(g2_capacity_bytes=10_000).g2_slots(4096) == 2
    assert KvbmConfig(g2_capacity_blocks=3).g2_slots(4096) == 3
    with pytest.raises(ConfigError, match="cannot hold one block") as info:
        KvbmConfig(g2_capacity_bytes=4095).g2_slots(4096)
    assert info.value.field == "g2_capacity_bytes"
    with pytest.raises(ValueError, match="block_bytes"):
        KvbmConfig(g2_capacity_blocks=3).g2_slots(0)


def test_g3_needs_the_layout_fingerprint(tmp_path) -> None:
    cfg = KvbmConfig.from_dict({"g2_capacity_blocks": 4, "g3_dir": str(tmp_path / "g3"), "g3_capacity_bytes": "1MiB"})
    with pytest.raises(ValueError, match="fingerprint"):
        BlockManager(cfg, block_size=4, block_bytes=64)
    assert not (tmp_path / "g3").exists()  # nothing is created before the arguments are checked


# -- the vLLM connector's load_failure against vLLM's kv_load_failure_policy -------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({}, None),
        ({"load_failure": None}, None),
        ({"load_failure": "fail"}, LoadFailurePolicy.FAIL),
        ({"load_failure": "recompute"}, LoadFailurePolicy.RECOMPUTE),
    ],
)
def test_load_failure_is_unset_unless_given(raw, expected) -> None:
    assert ConnectorConfig.from_extra_config(raw).load_failure is expected


@pytest.mark.parametrize(
    "configured, vllm_policy, expected",
    [
        (None, "fail", LoadFailurePolicy.RECOMPUTE),  # vLLM's default, maybe nobody's choice
        (None, "recompute", LoadFailurePolicy.RECOMPUTE),
        (LoadFailurePolicy.RECOMPUTE, "fail", LoadFailurePolicy.RECOMPUTE),
        (LoadFailurePolicy.RECOMPUTE, "recompute", LoadFailurePolicy.RECOMPUTE),
        (LoadFailurePolicy.FAIL, "fail", LoadFailurePolicy.FAIL),
    ],
)
def test_vllm_recompute_is_kept_and_its_fail_yields_to_kvbm(configured, vllm_policy, expected) -> None:
    assert resolve_load_failure(configured, vllm_policy) is expected


def test_kvbm_fail_against_vllm_recompute_is_a_conflict_naming_both() -> None:
    with pytest.raises(ConfigError, match="kv_load_failure_policy") as info:
        resolve_load_failure(LoadFailurePolicy.FAIL, "recompute")
    assert info.value.field == "load_failure"


def test_an_unknown_vllm_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match="kv_load_failure_policy"):
        resolve_load_failure(None, "retry")
