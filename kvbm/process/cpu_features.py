"""CPU feature permissions a process must request before vLLM runs on it.

Linux hands out AMX tile state only to processes that asked for it with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; the first AMX instruction of a
process that did not ask dies with SIGILL. vLLM's bf16 CPU attention kernel uses AMX tiles
for block sizes that are multiples of 32, and only oneDNN's matmuls ask for permission, so a
process whose first step is attention (a decode worker fed remote KV) crashes. Every process
that runs a vLLM engine calls :func:`request_amx_permission` first.
"""

from __future__ import annotations

import ctypes
import platform
import sys

_SYS_ARCH_PRCTL = 158  # x86_64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> bool:
    """Asks the kernel for AMX tile permission for this process.

    Safe to call any number of times and on any machine.

    Returns:
        True if the process may now use AMX tiles, False where the CPU, kernel or OS has
        no AMX (nothing to request, and nothing will crash).
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    return result == 0
