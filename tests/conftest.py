"""Shared fixtures: the embedded tiny model and real in-process vLLM engines.

Engines run in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor):
about 2 s to start once vLLM is imported, instead of 30 s for a server. One engine is shared
per test module; tests that need another build it with ``make_engine``.

In-process engines share vLLM's process-wide distributed state: shutting one down tears it
down under every other live engine (the next step fails or misbehaves). So engines are never
shut down one at a time; each module's engines are shut down together when the module ends,
and the next module's first engine sets the state up again.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvbm.cpu_features import request_amx_permission
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


@pytest.fixture(scope="module")
def make_engine() -> Iterator[Callable[[EngineSettings], object]]:
    """Factory for in-process vLLM engines; the module's engines are shut down together."""
    from vllm import LLM

    engines = []

    def make(settings: EngineSettings):
        llm = LLM(**settings.llm_kwargs())
        engines.append(llm)
        return llm

    yield make
    for llm in engines:
        llm.llm_engine.engine_core.shutdown()
    engines.clear()
    gc.collect()


@pytest.fixture(scope="module")
def engine(make_engine, tiny_model):
    """One in-process engine on the tiny model, shared by the tests of a module."""
    return make_engine(EngineSettings(model=tiny_model))


def greedy(max_tokens: int = 24):
    """Greedy sampling params."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
