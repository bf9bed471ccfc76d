"""The README's main command: the disaggregated demo answers its completions, shows every
worker's block stats, and stops."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_serves_disaggregated_completions_and_stops(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvbm.serving", "demo", "--log-dir", str(tmp_path), "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    completions = [line for line in lines if re.match(r"\[\d\] completion: ", line)]
    assert len(completions) == 3 and all(not line.endswith(": ''") for line in completions), lines
    ttfts = [line for line in lines if re.match(r"\[\d\] ttft: \d+ ms \(.*\), 8 tokens$", line)]
    assert len(ttfts) == 3, lines
    stats = {line.split(":")[0].strip(): line for line in lines if re.match(r"  w\d (prefill|decode): ", line)}
    assert set(stats) == {"w1 prefill", "w2 decode"}, lines
    pulled = re.search(r"remote blocks pulled (\d+)$", stats["w2 decode"])
    assert pulled and int(pulled.group(1)) > 0, stats
    assert lines[-1] == "stopped"
    for log in ("w1-prefill.log", "w2-decode.log"):
        assert "Application startup complete" in (tmp_path / log).read_text()


def test_demo_refuses_an_unknown_model():
    result = subprocess.run(
        [sys.executable, "-m", "kvbm.serving", "demo", "--model", "nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "'nonexistent' is neither a preset" in result.stderr
