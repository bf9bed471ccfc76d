"""Layout and G1 registration, batched block copies, the host buffer, and the CUDA path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.ids import BlockHash, JobId, Tier
from kvbm.layout import BlockLayout, EngineKV
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.blockcopy import coalesce, gather_blocks, scatter_blocks
from kvbm.transfer.engine import TransferEngine
from kvbm.transfer.host_copy import host_handlers
from kvbm.transfer.jobs import TransferJob

from .conftest import cuda_available


def test_layout_offsets_and_sizes() -> None:
    layout = BlockLayout((100, 20, 30))
    assert layout.offsets == (0, 100, 120) and layout.block_bytes == 150 and layout.num_layers == 3
    for bad in ((), (0,), (10, -1), (1.5,)):
        with pytest.raises(ValueError):
            BlockLayout(bad)  # type: ignore[arg-type]


def test_registers_vllm_cpu_tensors_without_copying() -> None:
    # vLLM's CPU backend: [num_blocks, num_kv_heads, block_size, 2 * head_size], bfloat16.
    tensors = [torch.zeros(6, 2, 32, 128, dtype=torch.bfloat16) for _ in range(3)]
    g1 = EngineKV.from_tensors(tensors)
    assert g1.layout.layer_bytes == (2 * 32 * 128 * 2,) * 3 and g1.num_blocks == 6
    assert g1.device == "cpu" and not g1.is_cuda
    g1.layer_arrays()[1][4] = 0xFF
    assert bool((tensors[1][4].view(torch.uint8) == 0xFF).all()) and not bool(tensors[1][3].any())
    assert g1.layer_tensors()[1].data_ptr() == tensors[1].data_ptr()


def test_planes_with_an_outer_kv_axis_register_separately() -> None:
    kv = torch.zeros(2, 5, 4, 8)  # [K/V, num_blocks, ...]
    g1 = EngineKV.from_tensors([kv[0], kv[1]])
    assert g1.layout.layer_bytes == (128, 128)
    g1.layer_arrays()[1][2] = 1
    assert bool(kv[1, 2].view(torch.uint8).eq(1).all()) and not bool(kv[0].any())


def test_padded_block_stride_is_fine() -> None:
    g1 = EngineKV.from_tensors([torch.zeros(10, 16)[::2], np.zeros((20, 8), dtype=np.float32)[::4]])
    assert g1.layout.layer_bytes == (64, 32) and g1.num_blocks == 5


@pytest.mark.parametrize(
    "tensors, error, match",
    [
        ([], ValueError, "at least one"),
        ([torch.zeros(4, 8, 2).transpose(1, 2)], ValueError, "contiguous"),
        ([np.zeros((4, 8, 2)).transpose(0, 2, 1)], ValueError, "contiguous"),
        ([torch.zeros(4, 4, 16)[:, :, :8]], ValueError, "contiguous"),
        ([torch.zeros(4, 8), torch.zeros(5, 8)], ValueError, "same number of blocks"),
        ([torch.zeros(0, 8)], ValueError, "no blocks"),
        ([torch.tensor(1.0)], ValueError, "scalar"),
        ([[1, 2, 3]], TypeError, "torch tensor or numpy"),
    ],
)
def test_bad_engine_tensors(tensors, error, match) -> None:
    with pytest.raises(error, match=match):
        EngineKV.from_tensors(tensors)


def test_coalesce_finds_runs_consecutive_on_both_sides() -> None:
    src, dst, n = coalesce(np.array([4, 5, 6, 9, 1, 2]), np.array([0, 1, 2, 3, 7, 8]))
    assert (src.tolist(), dst.tolist(), n.tolist()) == ([4, 9, 1], [0, 3, 7], [3, 1, 2])
    assert [len(a) for a in coalesce(np.zeros(0, np.int64), np.zeros(0, np.int64))] == [0, 0, 0]


def reference_gather(layers, offsets, ids, dst, slots) -> None:
    for layer, off in zip(layers, offsets):
        for b, s in zip(ids, slots):
            dst[s, off : off + layer.shape[1]] = layer[b]


@settings(max_examples=60, deadline=None)
@given(
    widths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    data=st.data(),
)
def test_gather_and_scatter_match_a_plain_loop(widths, data) -> None:
    nblocks, nslots = 24, 20
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    layers = [rng.integers(0, 256, (nblocks, w), dtype=np.uint8) for w in widths]
    offsets = list(np.cumsum([0, *widths[:-1]]))
    n = data.draw(st.integers(0, nslots))
    kind = data.draw(st.sampled_from(["runs", "slot-run", "scattered"]))
    if kind == "runs":
        ids, slots = np.arange(3, 3 + n), np.arange(nslots - n, nslots)
    elif kind == "slot-run":
        ids, slots = rng.permutation(nblocks)[:n], np.arange(n)
    else:
        ids, slots = rng.permutation(nblocks)[:n], rng.permutation(nslots)[:n]
    dst = np.zeros((nslots, sum(widths)), dtype=np.uint8)
    expected = dst.copy()
    gather_blocks(layers, offsets, ids, dst, slots)
    reference_gather(layers, offsets, ids, expected, slots)
    assert np.array_equal(dst, expected)
    back = [np.zeros_like(layer) for layer in layers]
    scatter_blocks(dst, slots, back, offsets, ids)
    for layer, restored in zip(layers, back):
        assert np.array_equal(restored[ids], layer[ids])
        untouched = np.setdiff1d(np.arange(nblocks), ids)
        assert not restored[untouched].any()


def test_copies_reject_bad_ids() -> None:
    layers, dst = [np.zeros((4, 8), np.uint8)], np.zeros((4, 8), np.uint8)
    with pytest.raises(ValueError, match="block id out of range"):
        gather_blocks(layers, [0], np.array([4]), dst, np.array([0]))
    with pytest.raises(ValueError, match="slot out of range"):
        scatter_blocks(dst, np.array([-1]), layers, [0], np.array([0]))
    with pytest.raises(ValueError, match="2 block ids for 1 slots"):
        gather_blocks(layers, [0], np.array([0, 1]), dst, np.array([0]))
    with pytest.raises(ValueError, match="overflows"):
        gather_blocks(layers, [4], np.array([0]), dst, np.array([0]))


def test_host_buffer_is_one_aligned_region() -> None:
    g2 = HostBuffer(3, 5000)
    assert g2.nbytes == 15000 and g2.address % 4096 == 0 and not g2.pinned
    assert [g2.slot_offset(i) for i in range(3)] == [0, 5000, 10000]
    with pytest.raises(ValueError):
        g2.slot_offset(3)
    g2.rows[1, 0] = 7
    assert int(g2.tensor()[5000]) == 7
    with pytest.raises(ValueError):
        HostBuffer(0, 10)


def test_handlers_require_matching_sizes() -> None:
    g1 = EngineKV.from_tensors([np.zeros((4, 64), np.uint8)])
    with pytest.raises(ValueError, match="cannot hold"):
        host_handlers(g1, HostBuffer(4, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_cuda_round_trip_through_pinned_g2() -> None:
    layers = [
        torch.randint(0, 255, (32, 2, 16, 64), dtype=torch.uint8, device="cuda").view(torch.bfloat16) for _ in range(3)
    ]
    g1 = EngineKV.from_tensors(layers)
    assert g1.is_cuda
    g2 = HostBuffer(16, g1.layout.block_bytes, pinned=True)
    expected = [b"".join(t[i].view(torch.uint8).cpu().numpy().tobytes() for t in layers) for i in range(32)]
    hashes = tuple(BlockHash(bytes([i]) * 16) for i in range(6))
    src, slots, back = [3, 4, 5, 20, 1, 9], [0, 1, 2, 7, 5, 6], [10, 11, 12, 13, 30, 31]
    with TransferEngine(host_handlers(g1, g2, cuda_staging_bytes=4 * g1.layout.block_bytes)) as engine:
        engine.submit(TransferJob(JobId(1), Tier.G1, Tier.G2, np.array(src), np.array(slots), hashes))
        engine.wait()
        [stored] = engine.poll()
        assert stored.ok and stored.checksums is not None
        assert [g2.rows[s].tobytes() for s in slots] == [expected[i] for i in src]
        job = TransferJob(JobId(2), Tier.G2, Tier.G1, np.array(slots), np.array(back), hashes, stored.checksums)
        engine.submit(job)
        engine.wait()
        [loaded] = engine.poll()
    assert loaded.ok
    torch.cuda.synchronize()
    for i, b in zip(src, back):
        assert b"".join(t[b].view(torch.uint8).cpu().numpy().tobytes() for t in layers) == expected[i]
