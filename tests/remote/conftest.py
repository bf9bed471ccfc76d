"""Shared helpers for the remote-transport tests.

Real workers run as spawned child processes (:mod:`tests.remote.peerproc`); the test process
itself never creates a NIXL agent, so a UCX failure can only take down a child, never pytest.
"""

from __future__ import annotations

import os

from kvbm.ids import BlockHash

os.environ.setdefault("UCX_TCP_NODELAY", "y")  # inherited by the spawned workers


def make_hashes(n: int, salt: int = 0) -> list[BlockHash]:
    """``n`` distinct 16-byte hashes."""
    return [BlockHash(int.to_bytes(salt * 1_000_003 + i + 1, 16, "little")) for i in range(n)]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
