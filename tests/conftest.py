"""Shared fixtures: the embedded tiny model and real in-process vLLM engines.

Engines run in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor):
about 2 s to start once vLLM is imported, instead of 30 s for a server. One engine is shared
per test module; tests that need another build it with ``make_engine``.

In-process engines share vLLM's process-wide state (distributed groups, the KV transfer
group): a second live engine takes the connector of the first, and shutting one down tears
the state down under the others. So ``make_engine`` shuts the module's previous engine down
before it builds the next one: only the newest engine works, and tests use engines in turn.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvbm.process.cpu_features import request_amx_permission
from kvbm.serving.embedded_model import ensure_model
from kvbm.serving.vllm_settings import EngineSettings, vllm_env

# Before anything imports vLLM: in-process engines, offline, and AMX allowed (the engine's
# first AMX user may be attention, which does not ask for permission itself).
os.environ.update(vllm_env(in_process=True))
request_amx_permission()

# Mixed lengths: shorter than a block, several blocks, and a shared prefix.
PROMPTS = [
    "The quick brown fox",
    "def main(argv):\n    parser = argparse.ArgumentParser()",
    "Hello world " * 40,
    "Hello world " * 40 + "and then something different happens",
    "In a hash-addressed block manager every block is named by the hash of its tokens",
]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Directory of the embedded tiny model (built once into the kvbm cache)."""
    return ensure_model("tiny")


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


@pytest.fixture(scope="module")
def make_engine() -> Iterator[Callable[[EngineSettings], object]]:
    """Factory for in-process vLLM engines; each call shuts the previous engine down first."""
    from vllm import LLM

    live = []

    def make(settings: EngineSettings):
        while live:
            _shutdown(live.pop())
        try:
            llm = LLM(**settings.llm_kwargs())
        except Exception:
            # An engine that failed after its workers came up (e.g. the scheduler-side
            # connector refused the config) leaves their KV connector registered
            # process-wide, and the next engine would take it over.
            from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

            ensure_kv_transfer_shutdown()
            raise
        live.append(llm)
        return llm

    yield make
    while live:
        _shutdown(live.pop())


@pytest.fixture(scope="module")
def engine(make_engine, tiny_model):
    """One in-process engine on the tiny model, shared by the tests of a module."""
    return make_engine(EngineSettings(model=tiny_model))


def greedy(max_tokens: int = 24):
    """Greedy sampling params."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture
def gated_loads(monkeypatch):
    """G2 -> G1 copies wait until the returned event is set (aborts land while they run)."""
    from kvbm.transfer.host_copy import HostLoadHandler

    gate = threading.Event()
    run = HostLoadHandler.run

    def gated(self, job):
        assert gate.wait(120), "the test never opened the gate"
        return run(self, job)

    monkeypatch.setattr(HostLoadHandler, "run", gated)
    yield gate
    gate.set()


def step_until(llm, done, limit_s: float = 120.0) -> list:
    """Step an in-process engine until ``done(finished outputs so far)``; returns them.
    The limit is a safety net against hangs, not a speed assertion."""
    import time

    finished: list = []
    end = time.monotonic() + limit_s
    while not done(finished):
        if time.monotonic() > end:
            raise AssertionError(f"not done after {limit_s} s of engine steps")
        finished += [out for out in llm.llm_engine.step() if out.finished]
        time.sleep(0.002)
    return finished
