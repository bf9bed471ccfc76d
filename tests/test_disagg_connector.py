"""Disaggregated prefill -> decode through KVBMConnector: the KV really crosses over NIXL.

The prefill worker is a real vLLM OpenAI server (its own process, NIXL agent and side
channel); the decode worker is an in-process engine, so the test reads its connector directly.
Each prompt is prefilled with ``do_remote_decode`` (one token), and its ``kv_transfer_params``
are handed to the decode engine, which pulls the prompt's blocks and generates. Greedy tokens
must equal vLLM alone, token for token; the stats must show blocks pulled and not recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
import urllib.request

import pytest

from conftest import greedy
from kvbm.serving.server_process import VLLMServer, free_port
from kvbm.serving.vllm_settings import EngineSettings

pytestmark = pytest.mark.slow

BLOCK = 32
SETTINGS = dict(max_model_len=2048, dtype="float32")  # float32: see test_connector.py
LEASE_S = 6.0  # short, so an unclaimed hold ends within the test
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the block manager watches. " * 10,
    "Document 7: " + "lorem ipsum dolor sit amet 7 " * 40,
    "The quick brown fox jumps over the lazy dog while the block manager watches. " * 10 + "And then?",
    "short prompt",  # under one block: nothing to hand off
]


def connector(worker: str, stats_port: int | None = None, **remote) -> dict:
    extra = {"g2_capacity_blocks": 256, "remote": {"worker": worker, "lease_s": LEASE_S, "heartbeat_s": 2.0, **remote}}
    if stats_port is not None:
        extra["stats_port"] = stats_port
    return {"kv_connector": "KVBMConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.load(reply)


@dataclasses.dataclass
class Prefill:
    server: VLLMServer
    stats_url: str

    def holds(self) -> dict:
        return get_json(self.stats_url)["remote"]["holds"]


def prefill(worker: Prefill, prompt: str) -> dict | None:
    reply = post(
        worker.server.url,
        {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": {"do_remote_decode": True},
        },
    )
    return reply.get("kv_transfer_params")


def decode(llm, prompts: list[str], params: list[dict | None]):
    from vllm import SamplingParams

    sampling = [
        SamplingParams(temperature=0.0, max_tokens=24, extra_args={"kv_transfer_params": p} if p else None)
        for p in params
    ]
    return llm.generate(prompts, sampling)


@contextlib.contextmanager
def first_steps(llm):
    """Records, per prompt (its token ids), how many tokens each new request had computed
    (loaded) when vLLM first scheduled it, and how many it computed in that step."""
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    seen: dict[tuple[int, ...], tuple[int, int]] = {}
    build = connector.build_connector_meta

    def recording(scheduler_output):
        for new in scheduler_output.scheduled_new_reqs:
            seen[tuple(new.prompt_token_ids)] = (
                new.num_computed_tokens,
                scheduler_output.num_scheduled_tokens[new.req_id],
            )
        return build(scheduler_output)

    connector.build_connector_meta = recording
    try:
        yield seen
    finally:
        del connector.build_connector_meta  # the class's method again


def tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


def remote_stats(llm) -> dict:
    return llm.llm_engine.engine_core.engine_core.scheduler.connector._scheduler.remote_stats


def wait_for(check, what: str, limit_s: float = 60.0):
    """Polls ``check`` (a safety net against hangs, not a speed assertion)."""
    end = time.monotonic() + limit_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(make_engine, tiny_model):
    llm = make_engine(EngineSettings(model=tiny_model, **SETTINGS))
    return tokens(llm.generate(PROMPTS, greedy()))


@pytest.fixture(scope="module")
def prefill_server(tiny_model, tmp_path_factory):
    stats_port = free_port()
    config = connector("prefill-0", stats_port, side_channel_port=free_port())
    settings = EngineSettings(model=tiny_model, kv_transfer_config=config, **SETTINGS)
    with VLLMServer(settings, tmp_path_factory.mktemp("prefill") / "server.log", served_name="tiny") as server:
        yield Prefill(server, f"http://127.0.0.1:{stats_port}/stats")


@pytest.fixture(scope="module")
def decode_engine(reference, make_engine, tiny_model):
    return make_engine(EngineSettings(model=tiny_model, kv_transfer_config=connector("decode-0"), **SETTINGS))


def test_decode_pulls_prefill_blocks_token_for_token(reference, prefill_server, decode_engine):
    params = [prefill(prefill_server, p) for p in PROMPTS]
    assert params[3]["kvbm"] is None  # one block or less: nothing handed off
    for p in params[:3]:
        assert p["do_remote_prefill"] is True and p["kvbm"]["num_blocks"] >= 1
        # The blocks travel granted: ids, hashes and checksums, under a lease taken in the
        # prefill's last step, so the decode reads at once and asks the prefill nothing.
        grant = p["kvbm"]["grant"]
        assert grant["tier"] == "g1" and grant["lease_id"] >= 1
    with first_steps(decode_engine) as first:
        outputs = decode(decode_engine, PROMPTS, params)
    assert tokens(outputs) == reference
    for p, out in zip(params[:3], outputs):
        # The prompt's last block travels too (its 1 to BLOCK tokens after the full blocks):
        # the decode computes only the prompt's last token, as after any full hit.
        prompt = len(out.prompt_token_ids)
        assert p["kvbm"]["tail_tokens"] == prompt - BLOCK * p["kvbm"]["num_blocks"] > 0
        assert first[tuple(out.prompt_token_ids)] == (prompt - 1, 1)
    pulled = sum(p["kvbm"]["num_blocks"] + 1 for p in params[:3])  # full blocks and the tail
    stats = remote_stats(decode_engine)
    assert stats["pulls"]["blocks_pulled"] == pulled and stats["pulls"]["blocks_failed"] == 0
    # Every pulled block was verified and none was handed back to vLLM to recompute.
    assert stats["pulls"]["checksum_failures"] == 0 and stats["load_error_blocks"] == 0
    # Every hold ends once read: the prefill frees its blocks.
    holds = wait_for(lambda: (h := prefill_server.holds())["holding"] == 0 and h, "the prefill's holds to end")
    assert holds["read"] == 3 and holds["unclaimed"] == 0 and holds["granted"] == 3


def test_unclaimed_hold_ends_at_lease(prefill_server):
    before = prefill_server.holds()
    params = prefill(prefill_server, PROMPTS[1] + " never decoded")
    assert params is not None
    holds = wait_for(
        lambda: (h := prefill_server.holds())["unclaimed"] > before["unclaimed"] and h,
        "the unclaimed hold to end",
        limit_s=LEASE_S * 10,
    )
    assert holds["holding"] == 0


def test_decode_with_the_blocks_already_releases_the_hold(prefill_server, decode_engine):
    before = prefill_server.holds()
    params = prefill(prefill_server, PROMPTS[0])  # the decode engine cached this prompt above
    decode(decode_engine, [PROMPTS[0]], [params])
    holds = wait_for(lambda: (h := prefill_server.holds())["holding"] == 0 and h, "the released hold to end")
    # Ended as read, long before its LEASE_S would have run out as unclaimed.
    assert holds["read"] == before["read"] + 1 and holds["unclaimed"] == before["unclaimed"]


def test_a_decode_request_aborted_before_it_ran_releases_its_grant(prefill_server, decode_engine):
    """The decode's connector hears of a request when vLLM queues it, so a client gone before
    the request was ever scheduled still frees the prefill's blocks, not only at lease_s."""
    from vllm import SamplingParams

    before = prefill_server.holds()
    prompt = "Aborted in the decode's queue: " + "the client leaves before any step " * 20
    params = prefill(prefill_server, prompt)
    assert params["kvbm"]["grant"] is not None
    engine = decode_engine.llm_engine
    engine.add_request(
        "gone-before-scheduled",
        prompt,
        SamplingParams(temperature=0.0, max_tokens=4, extra_args={"kv_transfer_params": params}),
    )
    engine.abort_request(["gone-before-scheduled"])  # the external id: vLLM maps it
    decode(decode_engine, ["the next request's step carries the release"], [None])
    holds = wait_for(
        lambda: (h := prefill_server.holds())["read"] > before["read"] and h,
        "the aborted request's grant to be released",
        limit_s=LEASE_S * 0.8,
    )
    assert holds["unclaimed"] == before["unclaimed"]


def redirected(handoff: dict, address: str, *, grant: bool = True) -> dict:
    """``handoff`` as if from a prefill incarnation at ``address`` this decode never met (its
    grant from an unknown agent, so the decode must ask that address for its metadata), or,
    with ``grant=False``, one to pull by hash from ``address``."""
    moved = json.loads(json.dumps(handoff))
    moved["kvbm"]["source"] = address
    if grant:
        moved["kvbm"]["grant"].update(source="prefill-0/gone", side_channel=address)
    else:
        del moved["kvbm"]["grant"]
        del moved["kvbm"]["tail_tokens"]  # a tail travels granted only
    return moved


def test_bad_handoffs_recompute(prefill_server, decode_engine):
    prompts = [f"Handoff case {i}: " + "the side channel answers with a grant " * 30 for i in range(3)]
    good = [prefill(prefill_server, p) for p in prompts]
    wrong_hash = json.loads(json.dumps(good[0]))
    wrong_hash["kvbm"]["last_hash"] = "00" * 16
    dead = f"127.0.0.1:{free_port()}"
    malformed = {"do_remote_prefill": True, "kvbm": {"source": 5}}
    bad_grant = json.loads(json.dumps(good[2]))
    bad_grant["kvbm"]["grant"]["checksums"] = "!"
    before = remote_stats(decode_engine)["pulls"]
    outputs = decode(
        decode_engine,
        prompts * 2,
        [wrong_hash, redirected(good[1], dead), malformed, bad_grant, redirected(good[1], dead, grant=False), None],
    )
    after = remote_stats(decode_engine)["pulls"]
    # Only the dead peers were tried (granted and by hash); each failed as unreachable and its
    # blocks were recomputed.
    assert after["jobs_failed"] == before["jobs_failed"] + 2
    assert after["failures"].get("unreachable", 0) == before["failures"].get("unreachable", 0) + 2
    # The same prompts with no handoff (now from the decode's own prefix cache) agree.
    assert tokens(outputs) == tokens(decode(decode_engine, prompts * 2, [None] * 6))


def token_prompts(seed: int, count: int, full_blocks: int, tail: int) -> list[list[int]]:
    """``count`` prompts of random token ids: ``full_blocks`` blocks in common, then a tail of
    ``tail`` tokens of each one's own."""
    import random

    rng = random.Random(seed)
    common = [rng.randrange(1, 1000) for _ in range(full_blocks * BLOCK)]
    return [common + [rng.randrange(1, 1000) for _ in range(tail)] for _ in range(count)]


def prefill_ids(worker: Prefill, ids: list[int]) -> dict:
    params = prefill(worker, ids)  # type: ignore[arg-type]  # the API takes token ids too
    assert params is not None and params["kvbm"]["tail_tokens"] == len(ids) % BLOCK
    return params


def decode_ids(llm, prompts: list[list[int]], params: list[dict | None]):
    return decode(llm, [{"prompt_token_ids": ids} for ids in prompts], params)  # type: ignore[misc]


def test_a_tail_that_differs_or_arrives_corrupt_is_computed_here(prefill_server, decode_engine):
    """The handed-off tail block is checked like the full ones: the tail of a prompt that ends
    otherwise (same full blocks, same length, other last tokens) is not loaded, and a tail whose
    bytes fail their checksum is recomputed. Loading either would change the output."""
    import base64

    mine, other = token_prompts(243, 2, full_blocks=6, tail=20)
    corrupt_ids = token_prompts(244, 1, full_blocks=6, tail=20)[0]
    others = prefill_ids(prefill_server, other)  # the decode gets the other prompt's handoff
    corrupt = prefill_ids(prefill_server, corrupt_ids)
    sums = bytearray(base64.b64decode(corrupt["kvbm"]["grant"]["checksums"]))
    sums[-8:] = bytes(8)  # the tail's checksum, last in the grant
    corrupt["kvbm"]["grant"]["checksums"] = base64.b64encode(bytes(sums)).decode()
    before = remote_stats(decode_engine)
    with first_steps(decode_engine) as first:
        outputs = decode_ids(decode_engine, [mine, corrupt_ids], [others, corrupt])
    after = remote_stats(decode_engine)
    assert first[tuple(mine)] == (6 * BLOCK, 20)  # the full blocks pulled, the tail computed here
    assert after["pulls"]["checksum_failures"] == before["pulls"]["checksum_failures"] + 1
    assert after["load_error_blocks"] == before["load_error_blocks"] + 1
    assert tokens(outputs) == tokens(decode_ids(decode_engine, [mine, corrupt_ids], [None, None]))


def test_a_tail_said_to_hold_more_than_a_block_is_not_loaded(prefill_server, decode_engine):
    ids = token_prompts(247, 1, full_blocks=6, tail=20)[0]
    params = prefill_ids(prefill_server, ids)
    params["kvbm"]["tail_tokens"] = 10**6  # a malformed handoff must not stop the engine
    with first_steps(decode_engine) as first:
        outputs = decode_ids(decode_engine, [ids], [params])
    assert first[tuple(ids)] == (6 * BLOCK, 20)
    assert tokens(outputs) == tokens(decode_ids(decode_engine, [ids], [None]))


def test_a_tail_alone_is_pulled_only_when_it_saves_more_than_half_a_block(prefill_server, decode_engine):
    """With the full blocks in the decode's own cache, a tail of more than half a block is
    still pulled (an asynchronous load for it alone); a shorter one is computed here, and the
    prefill's hold is released at once."""
    long_tail = token_prompts(245, 1, full_blocks=6, tail=BLOCK // 2 + 4)[0]
    short_tail = token_prompts(246, 1, full_blocks=6, tail=BLOCK // 2)[0]
    reference = tokens(decode_ids(decode_engine, [long_tail, short_tail], [None, None]))  # caches the blocks
    params = [prefill_ids(prefill_server, ids) for ids in (long_tail, short_tail)]
    before, holds = remote_stats(decode_engine), prefill_server.holds()
    with first_steps(decode_engine) as first:
        outputs = decode_ids(decode_engine, [long_tail, short_tail], params)
    after = remote_stats(decode_engine)
    assert tokens(outputs) == reference
    assert first[tuple(long_tail)] == (len(long_tail) - 1, 1)
    assert first[tuple(short_tail)] == (6 * BLOCK, BLOCK // 2)
    assert after["pulls"]["blocks_pulled"] == before["pulls"]["blocks_pulled"] + 1
    ended = wait_for(lambda: (h := prefill_server.holds())["holding"] == 0 and h, "both holds to end")
    assert ended["read"] == holds["read"] + 2 and ended["unclaimed"] == holds["unclaimed"]


def test_silent_and_garbage_peers_fail_by_their_deadline_and_recompute(prefill_server, decode_engine):
    """Injected timeouts and protocol errors inside a running engine: a side channel that
    accepts and never answers, and one that answers garbage. Neither may hang the decode."""
    prompts = [f"Peer fault {i}: " + "the grant never comes back from this peer " * 30 for i in range(2)]
    good = [prefill(prefill_server, p) for p in prompts]
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the connect; no reply
    garbage = socket.create_server(("127.0.0.1", 0))

    def answer_garbage() -> None:
        while True:
            try:
                peer, _ = garbage.accept()
            except OSError:
                return
            with peer:
                peer.recv(65536)
                peer.sendall(b"\xff" * 64)

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        params = []
        for grant in (True, False):  # the grant's metadata, or the grant by hash, never comes
            for handoff, server in zip(good, (silent, garbage)):
                params.append(redirected(handoff, "127.0.0.1:%d" % server.getsockname()[1], grant=grant))
        decode(decode_engine, ["warm-up"], [None])  # the engine's remote stats exist after a step
        before = remote_stats(decode_engine)["pulls"]
        outputs = decode(decode_engine, prompts * 2, params)
        after = remote_stats(decode_engine)["pulls"]
    finally:
        silent.close()
        garbage.close()
    assert after["jobs_failed"] == before["jobs_failed"] + 4
    failures = {
        k: n - before["failures"].get(k, 0) for k, n in after["failures"].items() if n > before["failures"].get(k, 0)
    }  # kinds earlier tests counted stay in the dict
    assert sum(failures.values()) == 4 and set(failures) <= {"unreachable", "deadline"}, failures
    assert tokens(outputs) == tokens(decode(decode_engine, prompts * 2, [None] * 4))


def test_dead_prefill_means_recompute(prefill_server, decode_engine):
    prompt = "A prompt this decode worker never saw: " + "the prefill dies after answering " * 30
    params = prefill(prefill_server, prompt)
    prefill_server.server.stop()
    before = remote_stats(decode_engine)["pulls"]["jobs_failed"]
    outputs = decode(decode_engine, [prompt], [params])
    assert remote_stats(decode_engine)["pulls"]["jobs_failed"] == before + 1
    assert tokens(outputs) == tokens(decode(decode_engine, [prompt], [None]))


def test_an_abort_mid_pull_keeps_the_blocks_until_the_pull_ends(make_engine, tiny_model, gated_loads):
    """A decode request with a partial local (G2) hit and a pull from a silent prefill is
    aborted while both run: vLLM may free its blocks only once neither can write them."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvbm.connectors.vllm.engine_layout import layout_fingerprint
    from kvbm.connectors.vllm.handoff import Handoff
    from kvbm.hashing import BlockHasher
    from conftest import step_until

    config = connector("decode-abort", pull_deadline_s=3.0)
    config["kv_connector_extra_config"]["async_load_min_blocks"] = 1
    llm = make_engine(
        EngineSettings(model=tiny_model, kv_transfer_config=config, num_gpu_blocks_override=80, **SETTINGS)
    )
    ids = llm.get_tokenizer()("Abort mid-pull: " + "the decode gives up while NIXL writes " * 60)["input_ids"]
    assert len(ids) > 17 * BLOCK
    gated_loads.set()
    llm.generate([TokensPrompt(prompt_token_ids=ids[: 8 * BLOCK + 5])], greedy(1))  # blocks 0-7 reach G2
    llm.generate([f"Filler {i} " + "xyzzy plugh " * 150 for i in range(2)], greedy(1))  # and leave G1
    hashes = (
        BlockHasher(layout_fingerprint(llm.llm_engine.vllm_config))
        .hash_prompt(np.asarray(ids[: 16 * BLOCK], dtype=np.int32))
        .hashes
    )
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: the pull hangs
    params = Handoff("127.0.0.1:%d" % silent.getsockname()[1], 16, hashes[15]).to_params()
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    try:
        gated_loads.clear()
        aborted = llm.llm_engine.add_request(
            "aborted",
            TokensPrompt(prompt_token_ids=ids[: 16 * BLOCK + 10]),
            SamplingParams(temperature=0.0, max_tokens=8, extra_args={"kv_transfer_params": params}),
        )
        for _ in range(3):
            llm.llm_engine.step()
        assert scheduler.requests[aborted].status.name == "WAITING_FOR_REMOTE_KVS"
        llm.llm_engine.abort_request(["aborted"])
        gated_loads.set()  # the local part of the load ends now; the pull runs to its deadline
        step_until(llm, lambda _: remote_stats(llm)["pulls"]["in_flight"] == 0 or aborted not in scheduler.requests)
        assert remote_stats(llm)["pulls"]["in_flight"] == 0, "freed while its pull could still write"
        step_until(llm, lambda _: aborted not in scheduler.requests)
    finally:
        silent.close()
    assert remote_stats(llm)["pulls"]["jobs_failed"] == 1 and remote_stats(llm)["pulls"]["blocks_failed"] == 8
    # Later requests on the same prompt are right: recomputed and cached paths agree.
    again = [TokensPrompt(prompt_token_ids=ids)]
    assert tokens(llm.generate(again, greedy())) == tokens(llm.generate(again, greedy()))
