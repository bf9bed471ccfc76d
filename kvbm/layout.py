"""Block layout and G1 registration: what one block's bytes are across the engine's tensors.

The engine hands kvbm one tensor per layer (or per K/V plane), each shaped
``[num_blocks, ...]`` with every block contiguous. kvbm treats a block as opaque bytes: each
tensor is viewed as ``[num_blocks, layer_bytes]`` uint8 (no copy), and one G2 slot holds the
block's bytes of every layer back to back, layer ``L`` at ``layout.offsets[L]``. Only whole
blocks are ever copied, which is the only safe unit when K and V rows interleave inside a block
(vLLM's CPU backend: ``[num_blocks, kv_heads, block_size, 2 * head_size]``).

A layout whose block axis is not outermost (e.g. ``[2, num_blocks, ...]``) is registered by
passing each plane (``t[0]``, ``t[1]``) as its own tensor. torch is imported only when torch
tensors are registered; numpy arrays work too (tests, non-torch engines).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Bytes per block of each registered tensor, in registration order.

    Raises:
        ValueError: no layers, or a layer size that is not a positive int.
    """

    layer_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.layer_bytes:
            raise ValueError("a layout needs at least one layer")
        for i, b in enumerate(self.layer_bytes):
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"layer {i}: bytes per block must be a positive int, got {b!r}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers: the size of one G2 slot."""
        return sum(self.layer_bytes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Byte offset of each layer inside a slot."""
        out, acc = [], 0
        for b in self.layer_bytes:
            out.append(acc)
            acc += b
        return tuple(out)


class EngineKV:
    """G1: the engine's KV tensors, registered (viewed, never copied or owned) by kvbm."""

    def __init__(self, views: Sequence[Any], *, device: str) -> None:
        """Use :meth:`from_tensors`; ``views`` are 2-D uint8 views (numpy on CPU, torch on CUDA)."""
        self._views = tuple(views)
        self._device = device
        self._layout = BlockLayout(tuple(int(v.shape[1]) for v in self._views))
        self._num_blocks = int(self._views[0].shape[0])

    @classmethod
    def from_tensors(cls, tensors: Sequence[Any]) -> EngineKV:
        """Register per-layer tensors (torch or numpy), each ``[num_blocks, ...]``.

        Raises:
            ValueError: no tensors, zero blocks, differing block counts or devices, or a
                tensor whose blocks are not each contiguous.
            TypeError: an entry is neither a torch tensor nor a numpy array.
        """
        if not tensors:
            raise ValueError("register at least one KV tensor")
        views, devices = [], set()
        for i, t in enumerate(tensors):
            view, device = _byte_view(i, t)
            views.append(view)
            devices.add(device)
        if len(devices) != 1:
            raise ValueError(f"all KV tensors must be on one device, got {sorted(devices)}")
        counts = {int(v.shape[0]) for v in views}
        if len(counts) != 1:
            raise ValueError(f"all KV tensors must have the same number of blocks, got {sorted(counts)}")
        return cls(views, device=devices.pop())

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def device(self) -> str:
        return self._device

    @property
    def is_cuda(self) -> bool:
        return self._device.startswith("cuda")

    def layer_arrays(self) -> tuple[np.ndarray, ...]:
        """Per-layer ``[num_blocks, layer_bytes]`` uint8 numpy views (host memory only).

        Raises:
            ValueError: the tensors live on a GPU.
        """
        if self.is_cuda:
            raise ValueError(f"KV tensors on {self._device} have no numpy view")
        return self._views

    def layer_tensors(self) -> tuple[Any, ...]:
        """Per-layer ``[num_blocks, layer_bytes]`` uint8 torch views (imports torch)."""
        if self.is_cuda:
            return self._views
        import torch

        return tuple(torch.from_numpy(v) for v in self._views)


def _byte_view(i: int, t: Any) -> tuple[Any, str]:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(t, torch.Tensor):
        width = _block_width(i, tuple(t.shape), t.element_size())
        try:
            flat = t.detach().view(torch.uint8).view(t.shape[0], width)
        except RuntimeError as exc:
            raise ValueError(f"KV tensor {i}: each block must be contiguous ({exc})") from None
        if flat.is_cuda:
            return flat, str(flat.device)
        return flat.numpy(), "cpu"
    if isinstance(t, np.ndarray):
        width = _block_width(i, t.shape, t.itemsize)
        try:
            flat = np.reshape(t.view(np.uint8), (t.shape[0], width), copy=False)
        except ValueError as exc:
            raise ValueError(f"KV tensor {i}: each block must be contiguous ({exc})") from None
        return flat, "cpu"
    raise TypeError(f"KV tensor {i}: expected a torch tensor or numpy array, got {type(t).__name__}")


def _block_width(i: int, shape: tuple[int, ...], itemsize: int) -> int:
    if not shape:
        raise ValueError(f"KV tensor {i}: expected [num_blocks, ...], got a scalar")
    if shape[0] == 0:
        raise ValueError(f"KV tensor {i}: has no blocks")
    width = math.prod(shape[1:]) * itemsize
    if width == 0:
        raise ValueError(f"KV tensor {i}: blocks of zero bytes")
    return width
