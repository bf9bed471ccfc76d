"""The same pulls with G1 in VRAM (skipped without CUDA): NIXL registers the layer tensors as
VRAM and UCX moves host <-> device bytes between the processes."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import cuda_available
from .peerproc import PeerSpec, close_peers, start_peers

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]


def test_vram_g1_pulls_both_ways_byte_exact():
    gpu, cpu = start_peers(PeerSpec("gpu", g1_device="cuda"), PeerSpec("cpu"))
    try:
        cpu.call("fill", tier="g2", ids=[0, 1, 2], seed=1)
        grant = cpu.call("grant", tier="g2", ids=[0, 1, 2])
        job = gpu.call("pull", grant=grant, tier="g1", ids=[5, 6, 7], metadata=cpu.metadata)
        assert gpu.call("wait", job_ids=[job])[0]["ok"]
        got, want = gpu.call("read", tier="g1", ids=[5, 6, 7]), cpu.call("read", tier="g2", ids=[0, 1, 2])
        np.testing.assert_array_equal(got, want)

        gpu.call("fill", tier="g1", ids=[3, 4], seed=2)
        grant = gpu.call("grant", tier="g1", ids=[3, 4])  # checksums computed from VRAM
        job = cpu.call("pull", grant=grant, tier="g1", ids=[0, 1], metadata=gpu.metadata)
        assert cpu.call("wait", job_ids=[job])[0]["ok"]
        np.testing.assert_array_equal(cpu.call("read", tier="g1", ids=[0, 1]), gpu.call("read", tier="g1", ids=[3, 4]))
    finally:
        assert close_peers(gpu, cpu) == [0, 0]
