"""Block hashing: chained xxh3_128 over numpy token arrays.

Contract:
    h[-1] = xxh3_128(canonical encoding of the LayoutFingerprint)
    h[i]  = xxh3_128(h[i-1] || int32-LE token bytes of block i || encoded BlockExtras of block i)

The fingerprint encodes as the magic ``kvbm.layout`` and a NUL byte, then, per field in
declaration order, its length-prefixed name and a tagged value: ``s`` + length-prefixed
UTF-8, ``i`` + int64-LE, or ``n`` for an unset optional field. Lengths are uint32-LE.

Only full blocks are chained. A prompt's last, partial block handed from a prefill to a
decode has a tail hash of its own (:meth:`BlockHasher.hash_tail`):
    t = xxh3_128("kvbm.tail" NUL || h[last full] || int32-LE tail tokens || encoded extras)

The encoding is explicit bytes (no ``repr``, no pickle, no
``hash()``), so equal inputs give equal hashes in any process, on any host, whatever
``PYTHONHASHSEED`` is. Token ids are hashed as little-endian int32: any integer dtype is
accepted and converted once per prompt; 64-bit and uint32 ids must lie in [0, 2**31).

Cost: one ``xxh3_128_digest`` call per block plus one bytes concatenation; the per-prompt
conversion is vectorised (``bench/hashing.py`` measures both against bare xxh3).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping

import numpy as np
from xxhash import xxh3_128_digest

from kvbm.ids import BlockHash

KVBM_FORMAT_VERSION = 2
"""Bumped whenever the hashed encoding or the stored block format changes.

2: the fingerprint gained weights, quantization, kv_cache_dtype, attention_backend and
hf_overrides, and ``BlockExtras`` keys LoRA by adapter identity (a string), not vLLM's id.
"""

TOKEN_DTYPE = np.dtype("<i4")
TAIL_TAG = b"kvbm.tail\x00"  # starts every tail hash's input (see BlockHasher.hash_tail)
_INT32_MAX = (1 << 31) - 1
_STR_FIELDS = frozenset({"model", "dtype", "layout_tag", "kv_cache_dtype"})
_OPTIONAL_STR_FIELDS = frozenset({"weights", "quantization", "attention_backend", "hf_overrides"})


@dataclasses.dataclass(frozen=True)
class LayoutFingerprint:
    """Everything that makes two engines' KV bytes for the same tokens differ.

    Attributes:
        model: the model's name or path (and revision).
        dtype: the model's (activation) dtype.
        layout_tag: the engine and its physical KV layout, e.g. ``vllm-cpu-LBNHC``.
        weights: identity of the weights themselves (a digest of the checkpoint files, or a
            pinned hub revision): a path names a place, and a place can hold another model
            later. None: not identified (only ``model`` names it).
        quantization: the weights' quantization method; None: not quantized.
        kv_cache_dtype: the dtype the KV cache is stored in (``"auto"``: ``dtype``).
        attention_backend: the attention backend the engine was told to use; None: its
            automatic choice (which ``layout_tag``'s device and layout then determine).
        hf_overrides: canonical text of the model-config overrides; None: none.

    Raises:
        ValueError: a field is empty, not positive, or ``tp_rank`` is outside ``tp_size``.
    """

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout_tag: str
    weights: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    attention_backend: str | None = None
    hf_overrides: str | None = None
    tp_rank: int = 0
    tp_size: int = 1
    format_version: int = KVBM_FORMAT_VERSION

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL_STR_FIELDS:
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"LayoutFingerprint.{f.name} must be None or a non-empty str, got {value!r}")
            elif f.name in _STR_FIELDS:
                if not isinstance(value, str) or not value:
                    raise ValueError(f"LayoutFingerprint.{f.name} must be a non-empty str, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"LayoutFingerprint.{f.name} must be an int, got {value!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size", "format_version"):
            if getattr(self, name) < 1:
                raise ValueError(f"LayoutFingerprint.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"LayoutFingerprint.tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")

    def encode(self) -> bytes:
        """Canonical bytes: magic, then each field as (name, type tag, value), in field order."""
        parts = [b"kvbm.layout\x00"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts.append(_encode_str(f.name))
            if value is None:
                parts.append(b"n")
            elif isinstance(value, str):
                parts.append(b"s" + _encode_str(value))
            else:
                parts.append(b"i" + struct.pack("<q", value))
        return b"".join(parts)

    def digest(self) -> BlockHash:
        """The chain's root h[-1]; also identifies the layout in stored indexes."""
        return BlockHash(xxh3_128_digest(self.encode()))


@dataclasses.dataclass(frozen=True)
class BlockExtras:
    """Per-block inputs besides tokens that change the KV: LoRA adapter, images, cache salt.

    Attributes:
        lora: the LoRA adapter's identity, the same in every process that serves it (never
            vLLM's ``lora_int_id``, which each process assigns for itself); None: no adapter.
        mm_hashes: identifiers of the multimodal items whose first placeholder is in the block.
        cache_salt: the request's cache salt.

    Raises:
        ValueError: a field has the wrong type.
    """

    lora: str | None = None
    mm_hashes: tuple[str, ...] = ()
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if self.lora is not None and not isinstance(self.lora, str):
            raise ValueError(f"BlockExtras.lora must be a str or None, got {self.lora!r}")
        if not isinstance(self.mm_hashes, tuple) or not all(isinstance(m, str) for m in self.mm_hashes):
            raise ValueError(f"BlockExtras.mm_hashes must be a tuple of str, got {self.mm_hashes!r}")
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise ValueError(f"BlockExtras.cache_salt must be a str or None, got {self.cache_salt!r}")

    def encode(self) -> bytes:
        """Canonical bytes; empty extras encode to ``b""`` (same hash as no extras)."""
        parts = []
        if self.lora is not None:
            parts.append(b"L" + _encode_str(self.lora))
        if self.mm_hashes:
            parts.append(b"M" + struct.pack("<I", len(self.mm_hashes)))
            parts.extend(_encode_str(m) for m in self.mm_hashes)
        if self.cache_salt is not None:
            parts.append(b"S" + _encode_str(self.cache_salt))
        return b"".join(parts)


@dataclasses.dataclass(frozen=True)
class HashedBlocks:
    """The full blocks of a token sequence: their hashes and their tokens.

    ``tokens`` is a read-only ``[len, block_size]`` int32 view; it aliases the caller's array
    when that array was already contiguous little-endian int32. Slicing gives a sub-range.
    """

    hashes: tuple[BlockHash, ...]
    tokens: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.dtype != TOKEN_DTYPE:
            got = f"{self.tokens.dtype} {self.tokens.shape}"
            raise ValueError(f"HashedBlocks.tokens must be 2-D int32, got {got}")
        if self.tokens.shape[0] != len(self.hashes):
            raise ValueError(f"{len(self.hashes)} hashes for {self.tokens.shape[0]} token rows")

    @property
    def block_size(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, index: slice) -> HashedBlocks:
        if not isinstance(index, slice):
            raise TypeError("HashedBlocks supports slicing only; use .hashes[i] for one hash")
        return HashedBlocks(self.hashes[index], self.tokens[index])


class BlockHasher:
    """Hashes token sequences for one layout. Stateless after construction; thread-safe."""

    def __init__(self, fingerprint: LayoutFingerprint) -> None:
        self._block_size = fingerprint.block_size
        self._root = fingerprint.digest()

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def root(self) -> BlockHash:
        return self._root

    def hash_prompt(
        self,
        tokens: np.ndarray,
        extras: Mapping[int, BlockExtras] | None = None,
        parent: BlockHash | None = None,
    ) -> HashedBlocks:
        """Hash every full block of ``tokens`` in one call.

        Args:
            tokens: 1-D integer numpy array of token ids; a trailing partial block is ignored.
            extras: optional per-block extras keyed by block index (relative to ``tokens[0]``);
                indices past the last full block are ignored.
            parent: hash of the block preceding ``tokens[0]``, to extend a chain; ``None``
                starts at the layout root.

        Raises:
            TypeError: ``tokens`` is not a numpy array.
            ValueError: ``tokens`` is not 1-D, not integer, has ids that do not fit int32, or an
                ``extras`` key is negative, or ``parent`` is not a 16-byte hash.
        """
        canon = canonical_tokens(tokens)
        bs = self._block_size
        n = canon.shape[0] // bs
        grid = canon[: n * bs].reshape(n, bs)
        grid.flags.writeable = False
        h: bytes = self._root if parent is None else _check_parent(parent)
        data = grid.tobytes()
        step = bs * TOKEN_DTYPE.itemsize
        encoded = _encode_extras(extras, n)
        # The walrus comprehension is the cheapest chained form measured (bench/hashing.py):
        # one slice, one 16-byte-prefix concatenation and one digest per block.
        if not encoded:
            out = [h := xxh3_128_digest(h + data[off : off + step]) for off in range(0, n * step, step)]
        else:
            out = [h := xxh3_128_digest(h + data[i * step : (i + 1) * step] + encoded.get(i, b"")) for i in range(n)]
        return HashedBlocks(tuple(out), grid)  # type: ignore[arg-type]

    def hash_tail(self, tokens: np.ndarray, parent: BlockHash, extras: BlockExtras | None = None) -> BlockHash:
        """Hash of a prompt's last, possibly partial block: the 1 to ``block_size`` tokens
        after the full block whose hash is ``parent`` (the layout root when none precedes).

        A prefill hands this block to a decode with the full ones, and the decode checks its
        own prompt ends with the very same tokens. The hash is domain-separated from full
        blocks' (a tag comes first), so a tail can never be taken for a full block.

        Raises:
            TypeError, ValueError: as :meth:`hash_prompt`; also no tokens or more than a block.
        """
        canon = canonical_tokens(tokens)
        if not 0 < canon.shape[0] <= self._block_size:
            raise ValueError(f"a tail holds 1 to {self._block_size} tokens, got {canon.shape[0]}")
        data = extras.encode() if extras is not None else b""
        return BlockHash(xxh3_128_digest(TAIL_TAG + _check_parent(parent) + canon.tobytes() + data))


def canonical_tokens(tokens: np.ndarray) -> np.ndarray:
    """Return ``tokens`` as a contiguous little-endian int32 array (no copy when it already is).

    Raises:
        TypeError: not a numpy array.
        ValueError: not 1-D, not an integer dtype, or 64-bit/uint32 ids outside [0, 2**31).
    """
    if not isinstance(tokens, np.ndarray):
        raise TypeError(f"tokens must be a 1-D numpy integer array, got {type(tokens).__name__}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.dtype.itemsize > 4 or (tokens.dtype.kind == "u" and tokens.dtype.itemsize == 4):
        # One pass: viewed as unsigned, a negative id is huge, so one max() checks both ends.
        unsigned = tokens.view(np.dtype(f"u{tokens.dtype.itemsize}").newbyteorder(tokens.dtype.byteorder))
        if tokens.size and int(unsigned.max()) > _INT32_MAX:
            raise ValueError("token ids of a 64-bit or uint32 array must lie in [0, 2**31)")
    return np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)


def _encode_extras(extras: Mapping[int, BlockExtras] | None, n: int) -> dict[int, bytes]:
    if not extras:
        return {}
    encoded = {}
    for index, extra in extras.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"extras keys must be non-negative block indices, got {index!r}")
        if not isinstance(extra, BlockExtras):
            raise ValueError(f"extras[{index}] must be BlockExtras, got {type(extra).__name__}")
        if index < n:
            data = extra.encode()
            if data:
                encoded[index] = data
    return encoded


def _check_parent(parent: bytes) -> BlockHash:
    if not isinstance(parent, bytes) or len(parent) != 16:
        raise ValueError(f"parent must be a 16-byte BlockHash, got {parent!r}")
    return BlockHash(parent)


def _encode_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw
