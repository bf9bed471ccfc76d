"""The embedded model is built offline and deterministically."""

from __future__ import annotations

import hashlib
import json

import pytest

from kvbm.serving.embedded_model import PRESETS, ensure_model


def file_digests(directory):
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def test_same_seed_builds_the_same_files(tmp_path, tiny_model):
    rebuilt = ensure_model("tiny", cache_dir=tmp_path)
    assert rebuilt.name == tiny_model.name
    assert file_digests(rebuilt) == file_digests(tiny_model)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(file_digests(rebuilt))


def test_second_call_reuses_the_build(tmp_path):
    first = ensure_model("tiny", cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("tiny", cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging left behind


def test_tiny_shape_fits_the_cpu_backend(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["head_dim"] == 32  # a head size vLLM's CPU attention supports
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 128


def test_bench_preset_is_the_design_shape():
    bench = PRESETS["bench"]
    assert (
        bench.hidden_size,
        bench.num_layers,
        bench.num_heads,
        bench.num_kv_heads,
        bench.head_dim,
        bench.intermediate_size,
        bench.vocab_size,
    ) == (1024, 8, 16, 8, 64, 2816, 2048)
    kv_bytes_per_token = 2 * bench.num_layers * bench.num_kv_heads * bench.head_dim * 2
    assert kv_bytes_per_token == 16 * 1024


def test_unknown_preset_is_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        ensure_model("huge", cache_dir=tmp_path)
