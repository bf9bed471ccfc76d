"""The router in front of real vLLM servers on the tiny model (127.0.0.1 only).

Two servers are shared by the module: A (used as the prefill worker, or as the worker that
joins under load) and B (decode/aggregated). Each test builds its own in-process router
with ``make_router``; all routers and servers stop at teardown.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvbm.serving.router import Router, RouterServer
from kvbm.serving.router_config import RouterConfig
from kvbm.serving.server_process import VLLMServer, free_port
from kvbm.serving.vllm_settings import EngineSettings
from kvbm.serving.workers import WorkerRole

from helpers import CHAT_TEMPLATE, MAX_TOKENS, MODEL, chat_body, completion_body, post, text_of

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "def main(argv):\n    parser = argparse.ArgumentParser()"]
# The tiny model has no chat template: the servers get this one.
POLLS = 200
POLL_S = 0.05


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """(A, B): two vLLM OpenAI servers serving the tiny model as ``tiny``."""
    logs = tmp_path_factory.mktemp("router-servers")
    template = logs / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    settings = EngineSettings(model=tiny_model, chat_template=template)
    pair = [VLLMServer(settings, logs / f"{name}.log", served_name=MODEL) for name in "AB"]
    try:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(server.start) for server in pair]:
                future.result()
        yield tuple(pair)
    finally:
        for server in pair:
            server.stop()


@pytest.fixture
def make_router():
    """Factory: a started router with the given workers; stopped at teardown."""
    started: list[RouterServer] = []

    def make(workers=(), **overrides) -> RouterServer:
        config = RouterConfig(
            **{
                "model_name": MODEL,
                "health_interval_s": 3600.0,
                "request_timeout_s": 120.0,
                "queue_timeout_s": 2.0,
                **overrides,
            }
        )
        router = Router(config)
        for role, url in workers:
            router.add_worker(role, url)
        server = RouterServer(router).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def stats(router: RouterServer) -> dict:
    return httpx.get(router.url + "/stats", timeout=10).json()


def test_models_and_health(servers, make_router):
    router = make_router([(WorkerRole.DECODE, servers[1].url)])
    assert httpx.get(router.url + "/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(router.url + "/health").json() == {"status": "ok", "workers_up": 1}


@pytest.mark.parametrize("stream", [False, True])
def test_completions_and_chat_equal_direct(servers, make_router, stream):
    direct = servers[1].url
    router = make_router([(WorkerRole.DECODE, direct)])
    for prompt in PROMPTS:
        body = completion_body(prompt, stream)
        expected = text_of(post(direct, "/v1/completions", body))
        assert expected
        assert text_of(post(router.url, "/v1/completions", body)) == expected
    expected = text_of(post(direct, "/v1/chat/completions", chat_body(stream)))
    assert text_of(post(router.url, "/v1/chat/completions", chat_body(stream))) == expected
    snapshot = stats(router)
    assert snapshot["requests"] == snapshot["succeeded"] == 3
    assert snapshot["routing"] == {"w1": {"aggregated": 3}}
    assert snapshot["ttft_s"]["count"] == 3
    if not stream:
        assert snapshot["itl_s"]["count"] == 0
        return
    # A short stream may reach the router in one TCP read (no gap to see); a long one cannot.
    long_body = dict(completion_body(PROMPTS[0], stream=True), max_tokens=200)
    assert text_of(post(router.url, "/v1/completions", long_body))
    assert stats(router)["itl_s"]["count"] > 0


def test_two_hop_prefill_then_decode_equals_direct(servers, make_router):
    prefill, decode = servers
    router = make_router([(WorkerRole.PREFILL, prefill.url), (WorkerRole.DECODE, decode.url)])
    bodies = [
        ("/v1/completions", completion_body(PROMPTS[0])),
        ("/v1/completions", completion_body(PROMPTS[1], stream=True)),
        ("/v1/chat/completions", chat_body()),
        ("/v1/chat/completions", chat_body(stream=True)),
    ]
    for path, body in bodies:
        assert text_of(post(router.url, path, body)) == text_of(post(decode.url, path, body))
    snapshot = stats(router)
    assert snapshot["routing"] == {"w1": {"prefill": 4}, "w2": {"decode": 4}}
    # Plain vLLM prefill returns no kv_transfer_params: decode recomputes, still exact.
    assert snapshot["transfer_failures"] == 4 and snapshot["disaggregated"] == 0
    assert snapshot["prefill_failures"] == 0 and snapshot["succeeded"] == 4
    assert snapshot["prefill_s"]["count"] == 4 and snapshot["prefill_s"]["p50"] > 0


def test_dead_prefill_worker_falls_back_to_aggregated(servers, make_router):
    dead = f"http://127.0.0.1:{free_port()}"
    router = make_router([(WorkerRole.PREFILL, dead), (WorkerRole.DECODE, servers[1].url)])
    body = completion_body(PROMPTS[0])
    assert text_of(post(router.url, "/v1/completions", body)) == text_of(post(servers[1].url, "/v1/completions", body))
    snapshot = stats(router)
    assert snapshot["prefill_failures"] == 1
    assert [w["healthy"] for w in snapshot["workers"]] == [False, True]
    post(router.url, "/v1/completions", body)
    assert stats(router)["routing"] == {"w1": {"prefill": 1}, "w2": {"decode": 1, "aggregated": 1}}


INVALID = [
    (b"{not json", 400, "invalid_json"),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "invalid_utf8"),
    (b'["a list"]', 400, "invalid_type"),
    (b'{"model": "tiny", "prompt": 7}', 400, "invalid_type"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', 400, "invalid_type"),
    (b'{"model": "tiny", "prompt": "x", "stream": 1}', 400, "invalid_type"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000000}', 400, "invalid_value"),
    (b'{"model": "other", "prompt": "x"}', 404, "model_not_found"),
    (b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}', 413, "body_too_large"),
]


def test_invalid_requests_are_4xx_and_router_stays_up(servers, make_router):
    router = make_router([(WorkerRole.DECODE, servers[1].url)], max_body_bytes=4096)
    for raw, status, code in INVALID:
        reply = httpx.post(router.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert reply.status_code == status, (raw[:40], reply.text)
        error = reply.json()["error"]
        assert error["code"] == code and error["message"] and error["type"]
    reply = httpx.post(router.url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert text_of(post(router.url, "/v1/completions", completion_body(PROMPTS[0])))
    snapshot = stats(router)
    assert snapshot["errors"]["invalid_request"] == len(INVALID) + 1
    assert snapshot["routing"] == {"w1": {"aggregated": 1}}


def test_add_and_drain_under_load_loses_no_request(servers, make_router):
    a, b = servers
    router = make_router([(WorkerRole.AGGREGATED, b.url)])
    body = completion_body(PROMPTS[1])
    expected = text_of(post(b.url, "/v1/completions", body))

    async def scenario():
        async with httpx.AsyncClient(base_url=router.url, timeout=120) as client:
            gate = asyncio.Semaphore(4)

            async def one() -> httpx.Response:
                async with gate:
                    return await client.post("/v1/completions", json=body)

            tasks = [asyncio.create_task(one()) for _ in range(20)]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            added = await client.post("/admin/workers", json={"role": "aggregated", "url": a.url})
            drained = await client.post("/admin/workers/w1/drain")
            removed = await client.delete("/admin/workers/w1")
            return added, drained, removed, await asyncio.gather(*tasks)

    added, drained, removed, replies = asyncio.run(scenario())
    assert added.status_code == 201 and added.json()["id"] == "w2"
    assert drained.status_code == 200 and drained.json()["state"] == "drained"
    assert drained.json()["in_flight"] == 0
    assert removed.status_code == 200
    assert [text_of(reply) for reply in replies] == [expected] * 20
    snapshot = stats(router)
    assert snapshot["succeeded"] == 20 and sum(snapshot["errors"].values()) == 0
    routed = {w: sum(hops.values()) for w, hops in snapshot["routing"].items()}
    assert routed["w1"] + routed["w2"] == 20 and routed["w2"] > 0
    assert [w["id"] for w in snapshot["workers"]] == ["w2"]
    assert httpx.delete(router.url + "/admin/workers/w2").status_code == 409  # not drained


def test_dead_worker_leaves_rotation_and_requests_retry(servers, make_router):
    dead = f"http://127.0.0.1:{free_port()}"
    router = make_router([(WorkerRole.DECODE, dead), (WorkerRole.DECODE, servers[1].url)])
    body = completion_body(PROMPTS[0])
    expected = text_of(post(servers[1].url, "/v1/completions", body))
    for stream in (False, True, False, True):
        assert text_of(post(router.url, "/v1/completions", completion_body(PROMPTS[0], stream))) == expected
    snapshot = stats(router)
    assert snapshot["retries"] == 1 and snapshot["errors"]["worker_failed"] == 1
    assert [w["healthy"] for w in snapshot["workers"]] == [False, True]
    assert snapshot["routing"] == {"w1": {"aggregated": 1}, "w2": {"aggregated": 4}}


def test_worker_answering_5xx_leaves_rotation_and_request_retries(servers, make_router):
    # A router with no workers answers every completion with 503: a failing worker.
    failing = make_router()
    router = make_router([(WorkerRole.DECODE, failing.url), (WorkerRole.DECODE, servers[1].url)])
    for stream in (True, False):
        body = completion_body(PROMPTS[1], stream)
        assert text_of(post(router.url, "/v1/completions", body)) == text_of(
            post(servers[1].url, "/v1/completions", body)
        )
    snapshot = stats(router)
    assert snapshot["retries"] == 1 and snapshot["errors"]["worker_failed"] == 1
    assert [(w["healthy"], w["in_flight"]) for w in snapshot["workers"]] == [(False, 0), (True, 0)]


def test_client_leaving_mid_stream_releases_the_worker(servers, make_router):
    router = make_router([(WorkerRole.DECODE, servers[1].url)])
    body = dict(completion_body(PROMPTS[0], stream=True), max_tokens=200)
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        assert next(reply.iter_lines()).startswith("data: ")
    for _ in range(POLLS):
        if stats(router)["workers"][0]["in_flight"] == 0:
            break
        time.sleep(POLL_S)
    assert stats(router)["workers"][0]["in_flight"] == 0
    drained = httpx.post(router.url + "/admin/workers/w1/drain", timeout=120)
    assert drained.status_code == 200 and drained.json()["state"] == "drained"


def test_only_dead_workers_give_clean_502_then_503(make_router):
    router = make_router([(WorkerRole.DECODE, f"http://127.0.0.1:{free_port()}")])
    reply = post(router.url, "/v1/completions", completion_body("x"))
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "worker_failed"
    reply = post(router.url, "/v1/completions", completion_body("x", stream=True))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "no_worker"
    assert httpx.get(router.url + "/health").json()["workers_up"] == 0


def test_health_probe_brings_a_worker_back(make_router):
    port = free_port()
    router = make_router([(WorkerRole.DECODE, f"http://127.0.0.1:{port}")], health_interval_s=0.05)
    # The probe (or the first request) takes the worker out of rotation.
    for _ in range(POLLS):
        reply = post(router.url, "/v1/completions", completion_body("x"))
        if reply.status_code == 503:
            break
        assert reply.status_code == 502
    assert not stats(router)["workers"][0]["healthy"]
    # Anything answering /health with 200 on that port counts as recovered: another router.
    revived = make_router(port=port)
    for _ in range(POLLS):
        if stats(router)["workers"][0]["healthy"]:
            break
        time.sleep(POLL_S)
    assert stats(router)["workers"][0]["healthy"]
    assert httpx.get(router.url + "/health").json()["workers_up"] == 1
    revived.stop()


def test_admin_token_required_when_configured(servers, make_router):
    token = "sesame-token-123"
    router = make_router([(WorkerRole.DECODE, servers[1].url)], admin_token=token)
    for headers in ({}, {"authorization": "Bearer wrong-token"}):
        reply = httpx.get(router.url + "/admin/workers", headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "unauthorized"
        reply = httpx.post(
            router.url + "/admin/workers", headers=headers, json={"role": "decode", "url": servers[0].url}
        )
        assert reply.status_code == 401
    auth = {"authorization": f"Bearer {token}"}
    listed = httpx.get(router.url + "/admin/workers", headers=auth).json()
    assert [(w["id"], w["role"], w["url"]) for w in listed] == [("w1", "decode", servers[1].url)]
    bad = httpx.post(router.url + "/admin/workers", headers=auth, json={"role": "boss", "url": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_worker"
    # Client routes need no token.
    assert text_of(post(router.url, "/v1/completions", completion_body("x")))


def test_stats_and_metrics_content(servers, make_router):
    router = make_router([(WorkerRole.DECODE, servers[1].url)])
    text_of(post(router.url, "/v1/completions", completion_body(PROMPTS[0], stream=True)))
    text_of(post(router.url, "/v1/completions", completion_body(PROMPTS[0])))
    post(router.url, "/v1/completions", {"model": "nope", "prompt": "x"})
    snapshot = stats(router)
    assert (snapshot["requests"], snapshot["succeeded"]) == (3, 2)
    assert snapshot["errors"]["invalid_request"] == 1
    assert snapshot["ttft_s"]["count"] == 2 and 0 < snapshot["ttft_s"]["p50"] <= snapshot["ttft_s"]["p99"]
    assert snapshot["prefill_s"]["count"] == 0  # no prefill worker: no prefill hop
    # One sample per token event after the first chunk; TCP may coalesce events into that chunk.
    assert 1 <= snapshot["itl_s"]["count"] <= MAX_TOKENS - 1 and snapshot["itl_s"]["p99"] > 0
    assert snapshot["workers"][0] | {"routed": 2, "in_flight": 0} == snapshot["workers"][0]
    metrics = httpx.get(router.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "kvbm_router_requests_total 3\n" in metrics.text
    assert 'kvbm_router_errors_total{kind="invalid_request"} 1' in metrics.text
    assert 'kvbm_router_routed_total{worker="w1",hop="aggregated"} 2' in metrics.text
    assert "kvbm_router_itl_seconds_count" in metrics.text
