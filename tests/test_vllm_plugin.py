"""vLLM finds kvbm's general plugin, and the plugin grants AMX permission."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvbm.process.cpu_features import request_amx_permission

# Reads the process's permitted extended features (ARCH_GET_XCOMP_PERM) after running the
# plugin hook the way vLLM does, and prints whether AMX tile data (bit 18) is among them.
CHECK_AMX = """
import ctypes
from vllm.plugins import load_plugins_by_group
plugins = load_plugins_by_group("vllm.general_plugins")
plugins["kvbm"]()
libc = ctypes.CDLL(None, use_errno=True)
mask = ctypes.c_uint64(0)
assert libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0
print(bool(mask.value & (1 << 18)))
"""


def test_vllm_loads_the_kvbm_general_plugin():
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "kvbm" in plugins
    plugins["kvbm"]()
    plugins["kvbm"]()  # vLLM may call a plugin more than once per process


def test_plugin_grants_amx_permission_in_a_fresh_process():
    if not request_amx_permission():
        pytest.skip("this CPU or kernel has no AMX")
    result = subprocess.run([sys.executable, "-c", CHECK_AMX], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True"


def test_import_kvbm_loads_no_engine_or_device_code():
    probe = (
        "import sys, kvbm, kvbm.process.cpu_features, kvbm.connectors.vllm; "
        "print(sorted(m for m in ('vllm', 'nixl', 'cupy', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
