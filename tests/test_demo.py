"""The README's main command: a real vLLM OpenAI server answers one completion, then stops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_serves_one_completion_and_stops(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvbm.serving", "demo", "--log-dir", str(tmp_path),
         "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    completion = [line for line in lines if line.startswith("completion: ")]
    assert len(completion) == 1 and len(completion[0]) > len("completion: ''")
    assert any(line.startswith("tokens: ") and " 8 completion" in line for line in lines)
    assert lines[-1] == "server stopped"
    assert "Application startup complete" in (tmp_path / "server.log").read_text()


def test_demo_reports_a_server_that_cannot_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvbm.serving", "demo", "--preset", "nonexistent"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "invalid choice: 'nonexistent'" in result.stderr
