"""Batched block copies between per-layer engine arrays (G1) and a slot buffer (G2), on numpy.

A G2 slot holds every layer of one block: layer ``L`` occupies bytes
``[offsets[L], offsets[L] + width_L)`` of the slot. Copies pick the cheapest numpy form that
fits the ids (measured in ``bench/transfer.py``):

1. runs where both sides are consecutive become one 2-D slice copy per layer;
2. onboarding into scattered engine blocks from consecutive slots uses fancy-index assignment
   per layer (no temporary: the source is a strided view);
3. otherwise one row copy per (block, layer) — the scattered-copy floor itself.

numpy releases the GIL during these copies, so they overlap with the engine when run on a
transfer thread. No torch op runs here, so torch's thread count does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MIN_RUN = 4  # below this average run length, per-run Python overhead beats the gain


def coalesce(src_ids: np.ndarray, dst_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split paired ids into runs consecutive on both sides: (src starts, dst starts, lengths)."""
    n = len(src_ids)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero((np.diff(src_ids) != 1) | (np.diff(dst_ids) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [n])))
    return src_ids[starts], dst_ids[starts], lengths


def gather_blocks(
    layers: Sequence[np.ndarray],
    offsets: Sequence[int],
    block_ids: np.ndarray,
    dst: np.ndarray,
    dst_slots: np.ndarray,
) -> None:
    """Copy engine blocks ``block_ids`` (every layer) into slot rows ``dst_slots`` of ``dst``.

    Raises:
        ValueError: ids out of range, lengths differ, or the layers do not fit in a slot row.
    """
    _check(layers, offsets, block_ids, dst, dst_slots)
    src_starts, dst_starts, lengths = coalesce(block_ids, dst_slots)
    if len(lengths) * _MIN_RUN <= len(block_ids):
        for layer, off in zip(layers, offsets):
            dv = dst[:, off : off + layer.shape[1]]
            for s, d, k in zip(src_starts.tolist(), dst_starts.tolist(), lengths.tolist()):
                dv[d : d + k] = layer[s : s + k]
        return
    pairs = list(zip(block_ids.tolist(), dst_slots.tolist()))
    for layer, off in zip(layers, offsets):
        dv = dst[:, off : off + layer.shape[1]]
        for s, d in pairs:
            dv[d] = layer[s]


def scatter_blocks(
    src: np.ndarray,
    src_slots: np.ndarray,
    layers: Sequence[np.ndarray],
    offsets: Sequence[int],
    block_ids: np.ndarray,
) -> None:
    """Copy slot rows ``src_slots`` of ``src`` back into engine blocks ``block_ids`` (every layer).

    Raises:
        ValueError: ids out of range, lengths differ, or the layers do not fit in a slot row.
    """
    _check(layers, offsets, block_ids, src, src_slots)
    src_starts, dst_starts, lengths = coalesce(src_slots, block_ids)
    if len(lengths) * _MIN_RUN <= len(block_ids):
        for layer, off in zip(layers, offsets):
            sv = src[:, off : off + layer.shape[1]]
            for s, d, k in zip(src_starts.tolist(), dst_starts.tolist(), lengths.tolist()):
                layer[d : d + k] = sv[s : s + k]
        return
    slot_starts, _, slot_lengths = coalesce(src_slots, np.arange(len(src_slots)))
    if len(slot_lengths) * _MIN_RUN <= len(block_ids):
        bounds = np.concatenate(([0], np.cumsum(slot_lengths))).tolist()
        for layer, off in zip(layers, offsets):
            sv = src[:, off : off + layer.shape[1]]
            for s, a, b in zip(slot_starts.tolist(), bounds[:-1], bounds[1:]):
                layer[block_ids[a:b]] = sv[s : s + b - a]
        return
    pairs = list(zip(src_slots.tolist(), block_ids.tolist()))
    for layer, off in zip(layers, offsets):
        sv = src[:, off : off + layer.shape[1]]
        for s, d in pairs:
            layer[d] = sv[s]


def copy_rows(src: np.ndarray, src_rows: np.ndarray, dst: np.ndarray, dst_rows: np.ndarray) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for 2-D arrays of equal width, coalescing runs."""
    gather_blocks([src], [0], src_rows, dst, dst_rows)


def _check(
    layers: Sequence[np.ndarray],
    offsets: Sequence[int],
    block_ids: np.ndarray,
    slots_array: np.ndarray,
    slots: np.ndarray,
) -> None:
    if len(block_ids) != len(slots):
        raise ValueError(f"{len(block_ids)} block ids for {len(slots)} slots")
    if len(layers) != len(offsets):
        raise ValueError(f"{len(layers)} layers for {len(offsets)} offsets")
    if len(block_ids) == 0:
        return
    for layer, off in zip(layers, offsets):
        if off < 0 or off + layer.shape[1] > slots_array.shape[1]:
            raise ValueError(f"a layer of width {layer.shape[1]} at offset {off} overflows a slot row")
    _check_range("block id", block_ids, min(layer.shape[0] for layer in layers))
    _check_range("slot", slots, slots_array.shape[0])


def _check_range(what: str, ids: np.ndarray, limit: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limit:
        raise ValueError(f"{what} out of range [0, {limit}): min {lo}, max {hi}")
