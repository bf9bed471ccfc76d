"""KVBMConnector in real in-process vLLM engines: token-for-token correct, served from G2.

Only the newest in-process engine works (see conftest), so the reference runs first and the
tests that share ``connector_engine`` come before those that build their own.

The reference is vLLM without the connector, with a G1 large enough to never evict: every
prompt is run cold once and again from vLLM's own prefix cache. The connector engine has a
G1 of 80 blocks, so the prompt set (more distinct prefixes than that) keeps evicting, and
repeats must come back from kvbm's G2.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from conftest import greedy
from kvbm.connectors.vllm.scheduler import STATS_INTERVAL_S
from kvbm.errors import ConfigError
from kvbm.serving.vllm_settings import EngineSettings

pytestmark = pytest.mark.slow

BLOCK = 32
# float32: bf16 results of a random model shift with batch shape (near-tied logits), and
# exact-match tests must compare KV paths, not rounding luck (DESIGN.md).
SMALL_G1 = dict(num_gpu_blocks_override=80, max_model_len=2048, dtype="float32")  # 2,560 tokens

SHARED = "The quick brown fox jumps over the lazy dog while the block manager watches. " * 12
PROMPTS = (
    [SHARED + f"Variant number {i} asks something else." for i in range(4)]  # shared prefix
    + [f"Document {i}: " + ("lorem ipsum dolor sit amet %d " % i) * 45 for i in range(6)]  # distinct
    + ["A short unique prompt", "def f(x):\n    return x * 2\n"]  # shorter than a block or two
)


def kvbm_config(**extra):
    return {
        "kv_connector": "KVBMConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"g2_capacity_blocks": 512, **extra},
    }


def tokens(outputs):
    return [list(out.outputs[0].token_ids) for out in outputs]


def pool_stats(llm) -> dict:
    return llm.llm_engine.engine_core.engine_core.scheduler.connector.stats.to_dict()


def g2_stats(llm) -> dict:
    """Block-pool stats of the engine's scheduler-side connector, taken now."""
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    return connector.stats.to_dict()["tiers"]["g2"]


@pytest.fixture(scope="module")
def reference(make_engine, tiny_model):
    """Greedy tokens of vLLM alone: each prompt's cached path equals its cold path."""
    llm = make_engine(EngineSettings(model=tiny_model, max_model_len=2048, dtype="float32"))
    cold = tokens(llm.generate(PROMPTS, greedy()))
    cached = tokens(llm.generate(PROMPTS, greedy()))
    assert cached == cold
    return cold


@pytest.fixture(scope="module")
def connector_engine(make_engine, tiny_model, reference):
    """Shared by the first tests; later tests build their own engines, which retire it."""
    return make_engine(EngineSettings(model=tiny_model, kv_transfer_config=kvbm_config(), **SMALL_G1))


def test_outputs_equal_vllm_alone_while_g1_keeps_evicting(connector_engine, reference):
    for _ in range(3):
        assert tokens(connector_engine.generate(PROMPTS, greedy())) == reference
    # One prompt at a time: each must find its prefix in G2, G1 having evicted it.
    assert [tokens(connector_engine.generate([p], greedy()))[0] for p in PROMPTS] == reference
    stats = g2_stats(connector_engine)
    assert stats["blocks_onboarded"] > 0 and stats["blocks_offloaded"] > 0
    assert stats["transfer_failures"] == 0 and stats["checksum_mismatches"] == 0


def test_repeated_long_prefix_is_served_from_g2(connector_engine):
    long_prompt = "Tiered caches keep the hot prefixes close to the engine. " * 60  # ~20+ blocks
    first = connector_engine.generate([long_prompt], greedy())[0]
    before = g2_stats(connector_engine)["blocks_onboarded"]
    # Push the prompt's blocks out of the 80-block G1.
    connector_engine.generate([f"Filler {i} " + "xyzzy plugh " * 150 for i in range(4)], greedy())
    again = connector_engine.generate([long_prompt], greedy())[0]
    onboarded = g2_stats(connector_engine)["blocks_onboarded"] - before
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    prompt_blocks = len(first.prompt_token_ids) // BLOCK
    assert again.num_cached_tokens >= (prompt_blocks - 1) * BLOCK
    assert onboarded >= prompt_blocks - 1 - first.num_cached_tokens // BLOCK


def test_vllm_stats_hook_is_rate_limited_and_ends_with_the_final_state(connector_engine):
    """vLLM asks for connector stats every step; a snapshot goes at most once per
    STATS_INTERVAL_S, and the state the engine idles in always goes (no step follows)."""
    side = connector_engine.llm_engine.engine_core.engine_core.scheduler.connector._scheduler
    sent: list[dict] = []
    hook = side.stats_for_vllm

    def recorded(now: float) -> dict | None:
        data = hook(now)
        if data is not None:
            sent.append(data)
        return data

    side.stats_for_vllm = recorded
    try:
        started = time.monotonic()
        connector_engine.generate([f"Stats {i} " + "lorem ipsum " * 120 for i in range(6)], greedy(32))
        elapsed = time.monotonic() - started
    finally:
        del side.stats_for_vllm
    assert sent and sent[-1] == pool_stats(connector_engine)
    assert len(sent) <= elapsed / STATS_INTERVAL_S + 2
    connector = connector_engine.llm_engine.engine_core.engine_core.scheduler.connector
    assert connector.get_kv_connector_stats() is None  # nothing changed since the idle step's
    assert not connector.has_pending_block_frees()  # every finished request's copies ended


def test_a_request_vllm_asks_about_every_step_it_waits_is_counted_once(connector_engine):
    """vLLM re-asks get_num_new_matched_tokens for a waiting request every step: one prompt
    is one sighting for hits, misses and the offload frequency filter."""
    from vllm.v1.request import Request

    connector = connector_engine.llm_engine.engine_core.engine_core.scheduler.connector
    request = Request("counted-once", list(range(1000, 1000 + 4 * BLOCK + 1)), greedy(4), None)
    before = pool_stats(connector_engine)["tiers"]["g2"]
    for _ in range(3):
        assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
    after = pool_stats(connector_engine)["tiers"]["g2"]
    assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (4, 0)
    assert connector.request_finished(request, []) == (False, None)  # the state goes


def record_load_modes(llm) -> list[bool]:
    """From now on, whether each local load the connector plans is asynchronous."""
    side = llm.llm_engine.engine_core.engine_core.scheduler.connector._scheduler
    chosen: list[bool] = []
    choose = side._load_async

    def recorded(req_id: str, blocks: int) -> bool:
        chosen.append(choose(req_id, blocks))
        return chosen[-1]

    side._load_async = recorded
    return chosen


def generate_beside_a_running_request(llm, prompts) -> list:
    """Greedy outputs of ``prompts``, added while another request is already decoding."""
    engine = llm.llm_engine
    engine.add_request("busy", "Busy: " + "keep decoding " * 20, greedy(max_tokens=400))
    engine.step()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy())
    done: dict[str, object] = {}
    while len(done) < len(prompts):
        done.update((out.request_id, out) for out in engine.step() if out.finished and out.request_id != "busy")
    engine.abort_request(["busy"])
    while engine.has_unfinished_requests():
        engine.step()
    return [done[str(i)] for i in range(len(prompts))]


def test_large_loads_are_asynchronous_only_beside_running_requests(make_engine, tiny_model, reference):
    llm = make_engine(
        EngineSettings(
            model=tiny_model, **SMALL_G1, kv_transfer_config=kvbm_config(sync_loads=True, async_load_min_blocks=2)
        )
    )
    assert tokens(llm.generate(PROMPTS, greedy())) == reference
    modes = record_load_modes(llm)
    onboarded = g2_stats(llm)["blocks_onboarded"]
    # One at a time on an idle engine: nobody would wait for a load, so none is asynchronous.
    assert [tokens(llm.generate([p], greedy()))[0] for p in PROMPTS] == reference
    assert g2_stats(llm)["blocks_onboarded"] > onboarded and not any(modes)
    idle_loads = len(modes)
    llm.generate([f"Filler {i} " + "xyzzy plugh " * 150 for i in range(4)], greedy())
    assert tokens(generate_beside_a_running_request(llm, PROMPTS)) == reference
    assert any(modes[idle_loads:])
    assert g2_stats(llm)["blocks_onboarded"] > 0


def test_corrupted_g2_bytes_are_recomputed_and_counted(make_engine, tiny_model, reference):
    config = kvbm_config(verify_g2_reads=True)
    config["kv_connector"] = "CorruptingG2Connector"
    config["kv_connector_module_path"] = "fault_connectors"
    llm = make_engine(EngineSettings(model=tiny_model, kv_transfer_config=config, **SMALL_G1))
    for _ in range(2):
        assert tokens(llm.generate(PROMPTS, greedy())) == reference
    stats = g2_stats(llm)
    assert stats["checksum_mismatches"] > 0
    assert stats["blocks_onboarded"] == 0  # nothing corrupt was passed on


def test_failed_loads_are_recomputed(make_engine, tiny_model, reference):
    config = kvbm_config()
    config["kv_connector"] = "DroppingLoadsConnector"
    config["kv_connector_module_path"] = "fault_connectors"
    llm = make_engine(EngineSettings(model=tiny_model, kv_transfer_config=config, **SMALL_G1))
    for _ in range(2):
        assert tokens(llm.generate(PROMPTS, greedy())) == reference
    assert g2_stats(llm)["blocks_onboarded"] > 0  # loads happened, and every one was dropped


def test_loaded_kv_is_what_the_engine_reads(make_engine, tiny_model, reference):
    """The control for the tests above: zeroed loads that nobody reports change the output."""
    config = kvbm_config()
    config["kv_connector"] = "SilentlyZeroingConnector"
    config["kv_connector_module_path"] = "fault_connectors"
    llm = make_engine(EngineSettings(model=tiny_model, kv_transfer_config=config, **SMALL_G1))
    llm.generate(PROMPTS, greedy())
    assert tokens(llm.generate(PROMPTS, greedy())) != reference


def g3_config(directory, **extra):
    # G2 of 48 blocks: a few prompts' worth, so after G1 and G2 evict, repeats come from G3.
    return kvbm_config(g2_capacity_blocks=48, g3_dir=str(directory), g3_capacity_bytes="64MiB", **extra)


def tier_stats(llm, tier: str) -> dict:
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    return connector.stats.to_dict()["tiers"][tier]


def test_prefix_is_served_from_g3_after_an_engine_restart(make_engine, tiny_model, reference, tmp_path):
    settings = EngineSettings(model=tiny_model, kv_transfer_config=g3_config(tmp_path / "g3"), **SMALL_G1)
    llm = make_engine(settings)
    assert tokens(llm.generate(PROMPTS, greedy())) == reference
    llm.generate(["flush"], greedy(1))  # one more step brings the last demotions' results home
    assert tier_stats(llm, "g3")["blocks_offloaded"] > 0

    restarted = make_engine(settings)  # the first engine is shut down: its G3 index is flushed
    outputs = [restarted.generate([p], greedy())[0] for p in PROMPTS]
    assert tokens(outputs) == reference
    g3 = tier_stats(restarted, "g3")
    assert g3["blocks_onboarded"] > 0 and g3["checksum_mismatches"] == 0
    # Demotions run behind offloads and G2 may be full of blocks still being demoted (a store
    # then takes fewer blocks), so not every block reaches G3; most long prompts' do.
    long_prompts = [out for out in outputs if len(out.prompt_token_ids) >= 4 * BLOCK]
    assert sum(out.num_cached_tokens >= 4 * BLOCK for out in long_prompts) >= len(long_prompts) // 2


def test_corrupted_g3_files_are_recomputed_and_counted(make_engine, tiny_model, reference, tmp_path):
    directory = tmp_path / "g3"
    settings = EngineSettings(model=tiny_model, kv_transfer_config=g3_config(directory), **SMALL_G1)
    llm = make_engine(settings)
    llm.generate(PROMPTS, greedy())
    llm.generate(["flush"], greedy(1))
    make_engine(EngineSettings(model=tiny_model, max_model_len=2048, dtype="float32"))  # release G3
    for slot_file in directory.glob("slots-*.bin"):  # flip one byte in every 4 KiB of every slot
        data = bytearray(slot_file.read_bytes())
        data[100::4096] = bytes(b ^ 0xFF for b in data[100::4096])
        slot_file.write_bytes(data)
    restarted = make_engine(settings)
    assert [tokens(restarted.generate([p], greedy()))[0] for p in PROMPTS] == reference
    g3 = tier_stats(restarted, "g3")
    assert g3["checksum_mismatches"] > 0 and g3["blocks_onboarded"] == 0


def test_stats_endpoint_serves_json_and_prometheus(make_engine, tiny_model):
    llm = make_engine(EngineSettings(model=tiny_model, **SMALL_G1, kv_transfer_config=kvbm_config(stats_port=0)))
    llm.generate(PROMPTS[:2], greedy())
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    base = f"http://127.0.0.1:{connector.stats_port}"
    with urllib.request.urlopen(base + "/stats", timeout=10) as response:
        stats = json.load(response)
    assert stats["tiers"]["g2"]["capacity_blocks"] == 512
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'kvbm_capacity_blocks{tier="g2"} 512' in text
    for path, status in (("/published?since=x", 400), ("/nope", 404)):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(base + path, timeout=10)
        assert error.value.code == status


def test_router_index_hashes_prompts_like_the_worker(make_engine, tiny_model):
    """KV-aware routing's view: a router hashes a prompt exactly as the worker that cached it."""
    import httpx

    from kvbm.serving.kv_index import KvIndex

    llm = make_engine(EngineSettings(model=tiny_model, **SMALL_G1, kv_transfer_config=kvbm_config(stats_port=0)))
    llm.generate(PROMPTS[4:6], greedy())
    base = f"http://127.0.0.1:{llm.llm_engine.engine_core.engine_core.scheduler.connector.stats_port}"
    index = KvIndex(tiny_model)
    with httpx.Client() as client:
        index.refresh(client, {"w": base})
    body = {"prompt": PROMPTS[4]}
    hashes = index.prompt_hashes(body)
    full_blocks = len(llm.get_tokenizer()(PROMPTS[4])["input_ids"]) // BLOCK
    assert len(hashes) == full_blocks > 0
    # Write-through offload put every full block computed into G2: all are published.
    assert all(h in index.published("w") for h in hashes[: full_blocks - 1])
    assert not any(h in index.published("w") for h in index.prompt_hashes({"prompt": PROMPTS[7]}))
    assert index.prompt_hashes({"prompt": 5}) == () and index.published("gone") == ()
    with httpx.Client() as client:
        index.refresh(client, {})
    assert index.published("w") == ()


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"g2_capacity_blockz": 10}, "g2_capacity_blockz"),
        ({"offload_policy": "sometimes"}, "offload_policy"),
        ({"g2_capacity_blocks": 0}, "g2_capacity_blocks"),
        ({"async_load_min_blocks": "many"}, "async_load_min_blocks"),
    ],
)
def test_bad_extra_config_stops_the_engine_with_the_field_named(make_engine, tiny_model, extra, field):
    config = {"kv_connector": "KVBMConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}
    with pytest.raises(ConfigError, match=field):
        make_engine(EngineSettings(model=tiny_model, kv_transfer_config=config, **SMALL_G1))
