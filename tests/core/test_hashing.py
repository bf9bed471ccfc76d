"""Block hashing: determinism, chaining, fingerprint and extras sensitivity, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvbm.hashing import BlockExtras, BlockHasher, HashedBlocks, LayoutFingerprint, canonical_tokens

from .conftest import BLOCK_SIZE, make_fingerprint, make_hasher, make_tokens

REPO = Path(__file__).resolve().parents[2]


def test_whole_prompt_hashes_full_blocks_only() -> None:
    blocks = make_hasher().hash_prompt(make_tokens(10 * BLOCK_SIZE + 3))
    assert len(blocks) == 10
    assert blocks.tokens.shape == (10, BLOCK_SIZE)
    assert all(isinstance(h, bytes) and len(h) == 16 for h in blocks.hashes)
    assert len(set(blocks.hashes)) == 10


def test_hashes_follow_the_documented_encoding() -> None:
    """An independent reimplementation of the spec in the module docstring."""
    fp = make_fingerprint()
    enc = b"kvbm.layout\x00"
    for f in dataclasses.fields(fp):
        value = getattr(fp, f.name)
        name = f.name.encode()
        enc += struct.pack("<I", len(name)) + name
        if value is None:
            enc += b"n"
        elif isinstance(value, str):
            enc += b"s" + struct.pack("<I", len(value.encode())) + value.encode()
        else:
            enc += b"i" + struct.pack("<q", value)
    tokens = np.arange(2 * BLOCK_SIZE, dtype=np.int32)
    h = xxhash.xxh3_128_digest(enc)
    expected = []
    for i in range(2):
        h = xxhash.xxh3_128_digest(h + tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE].astype("<i4").tobytes())
        expected.append(h)
    assert fp.encode() == enc
    assert list(BlockHasher(fp).hash_prompt(tokens).hashes) == expected


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.uint32, np.int16, np.dtype(">i8")])
def test_integer_dtypes_hash_alike(dtype) -> None:
    tokens = make_tokens(6 * BLOCK_SIZE, vocab=30000)
    hasher = make_hasher()
    assert hasher.hash_prompt(tokens.astype(dtype)).hashes == hasher.hash_prompt(tokens).hashes


def test_a_changed_token_changes_its_block_and_every_later_one() -> None:
    tokens = make_tokens(8 * BLOCK_SIZE)
    changed = tokens.copy()
    changed[3 * BLOCK_SIZE + 1] += 1
    hasher = make_hasher()
    a, b = hasher.hash_prompt(tokens).hashes, hasher.hash_prompt(changed).hashes
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:]))


def test_parent_extends_a_chain() -> None:
    hasher = make_hasher()
    tokens = make_tokens(8 * BLOCK_SIZE)
    whole = hasher.hash_prompt(tokens)
    tail = hasher.hash_prompt(tokens[5 * BLOCK_SIZE :], parent=whole.hashes[4])
    assert tail.hashes == whole.hashes[5:]


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "other-model"),
        ("dtype", "float16"),
        ("num_layers", 3),
        ("num_kv_heads", 4),
        ("head_dim", 64),
        ("layout_tag", "test-hnd"),
        ("tp_rank", 1),
        ("tp_size", 4),
        ("format_version", 3),
        ("weights", "xxh3:0123"),
        ("quantization", "fp8"),
        ("kv_cache_dtype", "fp8_e4m3"),
        ("attention_backend", "FLASH_ATTN"),
        ("hf_overrides", '{"rope_theta":1000}'),
    ],
)
def test_every_fingerprint_field_changes_the_hashes(field: str, value: object) -> None:
    tokens = make_tokens(2 * BLOCK_SIZE)
    overrides = {field: value}
    if field == "tp_rank":
        overrides["tp_size"] = 2
    assert make_hasher(**overrides).hash_prompt(tokens).hashes[0] != make_hasher().hash_prompt(tokens).hashes[0]


def test_block_size_is_part_of_the_fingerprint() -> None:
    tokens = make_tokens(8 * BLOCK_SIZE)
    double = make_hasher(block_size=2 * BLOCK_SIZE).hash_prompt(tokens)
    assert len(double) == 4
    assert not set(double.hashes) & set(make_hasher().hash_prompt(tokens).hashes)


def test_extras_change_their_block_and_later_ones() -> None:
    hasher = make_hasher()
    tokens = make_tokens(5 * BLOCK_SIZE)
    plain = hasher.hash_prompt(tokens).hashes
    for extra in (BlockExtras(lora="adapter-7"), BlockExtras(mm_hashes=("img-a",)), BlockExtras(cache_salt="tenant-1")):
        salted = hasher.hash_prompt(tokens, extras={2: extra}).hashes
        assert salted[:2] == plain[:2]
        assert all(x != y for x, y in zip(salted[2:], plain[2:]))


def test_extras_are_encoded_unambiguously() -> None:
    hasher = make_hasher()
    tokens = make_tokens(2 * BLOCK_SIZE)
    variants = [
        BlockExtras(mm_hashes=("a", "b")),
        BlockExtras(mm_hashes=("b", "a")),
        BlockExtras(mm_hashes=("ab",)),
        BlockExtras(lora="1"),
        BlockExtras(lora="2"),
        BlockExtras(lora=""),
        BlockExtras(cache_salt="1"),
    ]
    firsts = {hasher.hash_prompt(tokens, extras={0: v}).hashes[0] for v in variants}
    assert len(firsts) == len(variants)


def test_empty_extras_and_extras_past_the_last_block_change_nothing() -> None:
    hasher = make_hasher()
    tokens = make_tokens(3 * BLOCK_SIZE + 1)
    plain = hasher.hash_prompt(tokens).hashes
    assert hasher.hash_prompt(tokens, extras={0: BlockExtras(), 3: BlockExtras(lora="a")}).hashes == plain


def test_hashes_are_identical_in_another_process() -> None:
    tokens = make_tokens(16 * BLOCK_SIZE, seed=3)
    extras = {1: BlockExtras(lora="l", mm_hashes=("x",), cache_salt="s")}
    here = make_hasher().hash_prompt(tokens, extras=extras).hashes
    script = textwrap.dedent(
        f"""
        import numpy as np
        from kvbm.hashing import BlockExtras, BlockHasher, LayoutFingerprint
        fp = LayoutFingerprint(**{dataclasses.asdict(make_fingerprint())!r})
        tokens = np.array({tokens.tolist()!r}, dtype=np.int64)
        extras = {{1: BlockExtras(lora="l", mm_hashes=("x",), cache_salt="s")}}
        print(",".join(h.hex() for h in BlockHasher(fp).hash_prompt(tokens, extras=extras).hashes))
        """
    )
    outputs = []
    for seed in ("0", "random", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outputs.append(proc.stdout.strip())
    assert outputs[0] == outputs[1] == outputs[2] == ",".join(h.hex() for h in here)


def test_tokens_view_is_read_only_and_sliceable() -> None:
    blocks = make_hasher().hash_prompt(make_tokens(6 * BLOCK_SIZE))
    with pytest.raises(ValueError):
        blocks.tokens[0, 0] = 1
    part = blocks[2:5]
    assert isinstance(part, HashedBlocks)
    assert part.hashes == blocks.hashes[2:5]
    assert np.array_equal(part.tokens, blocks.tokens[2:5])
    with pytest.raises(TypeError, match="slicing"):
        blocks[0]  # type: ignore[index]


@pytest.mark.parametrize(
    "tokens, error, match",
    [
        ([1, 2, 3, 4], TypeError, "numpy"),
        (np.arange(8, dtype=np.float32), ValueError, "integer dtype"),
        (np.arange(8).reshape(2, 4), ValueError, "1-D"),
        (np.ones(8, dtype=bool), ValueError, "integer dtype"),
        (np.array([1, 2, 3, 1 << 40]), ValueError, r"\[0, 2\*\*31\)"),
        (np.array([1, 2, 3, 1 << 31], dtype=np.uint32), ValueError, r"\[0, 2\*\*31\)"),
        (np.array([1, -2, 3, 4]), ValueError, r"\[0, 2\*\*31\)"),
        (np.int64(5), TypeError, "numpy"),
        (np.zeros((), dtype=np.int64), ValueError, "1-D"),
    ],
)
def test_bad_tokens_raise_clear_errors(tokens, error, match) -> None:
    with pytest.raises(error, match=match):
        make_hasher().hash_prompt(tokens)


def test_bad_extras_and_parent_raise() -> None:
    hasher = make_hasher()
    tokens = make_tokens(2 * BLOCK_SIZE)
    with pytest.raises(ValueError, match="non-negative"):
        hasher.hash_prompt(tokens, extras={-1: BlockExtras(lora="a")})
    with pytest.raises(ValueError, match="BlockExtras"):
        hasher.hash_prompt(tokens, extras={0: "lora"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="16-byte"):
        hasher.hash_prompt(tokens, parent=b"short")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mm_hashes"):
        BlockExtras(mm_hashes=["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lora"):
        BlockExtras(lora=7)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model": ""}, "model"),
        ({"block_size": 0}, "block_size"),
        ({"head_dim": -1}, "head_dim"),
        ({"tp_rank": 2, "tp_size": 2}, "tp_rank"),
        ({"num_layers": 2.0}, "num_layers"),
        ({"layout_tag": 3}, "layout_tag"),
        ({"tp_size": True}, "tp_size"),
        ({"weights": ""}, "weights"),
        ({"quantization": 8}, "quantization"),
        ({"kv_cache_dtype": None}, "kv_cache_dtype"),
    ],
)
def test_bad_fingerprints_name_the_field(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_fingerprint(**overrides)


def test_canonical_tokens_does_not_copy_int32() -> None:
    tokens = np.arange(16, dtype=np.int32)
    assert canonical_tokens(tokens) is tokens
    assert canonical_tokens(tokens.astype(np.int64)).dtype == np.dtype("<i4")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "weights": "xxh3:ab",
            "quantization": "awq",
            "kv_cache_dtype": "fp8",
            "attention_backend": "TRITON_ATTN",
            "hf_overrides": "{}",
        },
    ],
)
def test_fingerprint_round_trips_through_json(overrides) -> None:
    """The router rebuilds a worker's fingerprint from its ``/layout`` JSON (asdict)."""
    fp = make_fingerprint(**overrides)
    again = LayoutFingerprint(**json.loads(json.dumps(dataclasses.asdict(fp))))
    assert again == fp and again.digest() == fp.digest()


def test_fingerprint_digest_is_the_chain_root() -> None:
    fp = make_fingerprint()
    assert BlockHasher(fp).root == fp.digest() == xxhash.xxh3_128_digest(fp.encode())
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp.model = "other"  # type: ignore[misc]


def test_a_tail_hash_follows_the_documented_encoding_and_names_its_tokens() -> None:
    hasher = make_hasher()
    tokens = make_tokens(2 * BLOCK_SIZE + BLOCK_SIZE // 2 + 1)
    full = hasher.hash_prompt(tokens)
    tail = hasher.hash_tail(tokens[2 * BLOCK_SIZE :], full.hashes[-1])
    assert tail == xxhash.xxh3_128_digest(
        b"kvbm.tail\x00" + full.hashes[-1] + tokens[2 * BLOCK_SIZE :].astype("<i4").tobytes()
    )
    # Never a full block's hash, even for a whole block of tokens; the parent and every token count.
    whole = hasher.hash_tail(tokens[BLOCK_SIZE : 2 * BLOCK_SIZE], full.hashes[0])
    assert whole != full.hashes[1]
    assert hasher.hash_tail(tokens[2 * BLOCK_SIZE : -1], full.hashes[-1]) != tail
    assert hasher.hash_tail(tokens[2 * BLOCK_SIZE :], full.hashes[0]) != tail
    assert hasher.hash_tail(tokens[2 * BLOCK_SIZE :], full.hashes[-1], BlockExtras(cache_salt="s")) != tail


@pytest.mark.parametrize("count", [0, BLOCK_SIZE + 1])
def test_a_tail_holds_one_to_a_block_of_tokens(count) -> None:
    hasher = make_hasher()
    with pytest.raises(ValueError, match="a tail holds"):
        hasher.hash_tail(make_tokens(count), hasher.root)
