"""Router pieces without servers: config, validation, worker pool, routing choice, stats,
the admin API over a fake launcher, health verdicts and the admission queue."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.responses import StreamingResponse
from starlette.testclient import TestClient

from helpers import FakeClock
from kvbm.connectors.vllm.handoff import Handoff
from kvbm.ids import BlockHash, Tier
from kvbm.remote import BlockGrant, LeaseId, exchange
from kvbm.remote.metadata import AgentName
from kvbm.remote.sidechannel import SideChannelServer
from kvbm.serving.admission import AdmissionQueue
from kvbm.serving.forwarding import Forwarder
from kvbm.serving.health import Health, ProbeVerdicts, check_health
from kvbm.serving.router import Router
from kvbm.serving.router_config import RouterConfig
from kvbm.serving.router_stats import (
    ErrorKind,
    Hop,
    RouterStats,
    WorkerReply,
    fetch_worker_stats,
    merge_worker_metrics,
    percentile,
)
from kvbm.serving.router_validation import Endpoint, RequestError, parse_request
from kvbm.serving.routing import choose_by_load, choose_prefill, prefix_overlap
from kvbm.serving.workers import DECODE_ROLES, WorkerPool, WorkerRole, WorkerState

MODEL = "tiny"


def make_config(**overrides) -> RouterConfig:
    return RouterConfig(**{"model_name": MODEL, **overrides})


def make_pool(*roles: WorkerRole) -> WorkerPool:
    pool = WorkerPool()
    for i, role in enumerate(roles):
        pool.add(role, f"http://127.0.0.1:{9000 + i}")
    return pool


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model_name": ""}, "model_name"),
        ({"port": 70000}, "port"),
        ({"port": True}, "port"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"max_tokens_cap": -1}, "max_tokens_cap"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"health_interval_s": -1.0}, "health_interval_s"),
        ({"host": "0.0.0.0"}, "admin_token"),
        ({"admin_token": "short"}, "admin_token"),
        ({"queue_size": -1}, "queue_size"),
        ({"queue_size": 2.5}, "queue_size"),
        ({"queue_size": True}, "queue_size"),
        ({"queue_timeout_s": 0}, "queue_timeout_s"),
        ({"queue_timeout_s": float("nan")}, "queue_timeout_s"),
        ({"queue_timeout_s": float("inf")}, "queue_timeout_s"),
        ({"queue_timeout_s": "30"}, "queue_timeout_s"),
    ],
)
def test_config_rejects_bad_field_by_name(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_config(**overrides)


def test_config_queue_defaults_and_no_queue():
    config = make_config()
    assert (config.queue_size, config.queue_timeout_s) == (256, 30.0)
    assert make_config(queue_size=0).queue_size == 0  # no waiting: a 503 at once


def test_config_non_loopback_with_token_is_valid():
    config = make_config(host="0.0.0.0", admin_token="secret-token")
    assert config.admin_token == "secret-token"
    assert make_config(host="::1").host == "::1"


# --- validation ---------------------------------------------------------------------------


def parse(body, endpoint=Endpoint.COMPLETIONS, **overrides) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, endpoint, make_config(**overrides))


def refused(body, endpoint=Endpoint.COMPLETIONS, **overrides) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(body, endpoint, **overrides)
    return info.value


def test_valid_bodies_pass_through_unchanged():
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True, "extra": 1}
    assert parse(body) == body
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert parse(chat, Endpoint.CHAT) == chat
    assert parse({"model": MODEL, "prompt": [1, 2, 3]})["prompt"] == [1, 2, 3]
    assert parse({"model": MODEL, "prompt": [[1], [2, 3]]})["prompt"] == [[1], [2, 3]]


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        (b"{not json", 400, "invalid_json", None),
        (b"\xff\xfe{}", 400, "invalid_utf8", None),
        ([1, 2], 400, "invalid_type", None),
        ({"prompt": "x"}, 400, "invalid_type", "model"),
        ({"model": "gpt-9", "prompt": "x"}, 404, "model_not_found", "model"),
        ({"model": MODEL}, 400, "missing_field", "prompt"),
        ({"model": MODEL, "prompt": 5}, 400, "invalid_type", "prompt"),
        ({"model": MODEL, "prompt": []}, 400, "invalid_type", "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "4"}, 400, "invalid_type", "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "invalid_type", "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "invalid_value", "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "invalid_value", "max_tokens"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "invalid_type", "stream"),
    ],
)
def test_invalid_completion_bodies(body, status, code, param):
    error = refused(body)
    assert (error.status, error.code, error.param) == (status, code, param)
    assert error.as_json()["error"]["message"] == error.message and error.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": ["hi"]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
    ],
)
def test_invalid_chat_bodies(body, param):
    assert refused(body, Endpoint.CHAT).param == param


def test_oversize_body_is_413():
    error = refused({"model": MODEL, "prompt": "x" * 200}, max_body_bytes=100)
    assert error.status == 413 and error.code == "body_too_large"


# --- worker pool --------------------------------------------------------------------------


def test_pool_ids_roles_and_duplicates():
    pool = make_pool(WorkerRole.PREFILL, WorkerRole.DECODE)
    assert [(w.id, w.role) for w in pool.all()] == [("w1", WorkerRole.PREFILL), ("w2", WorkerRole.DECODE)]
    with pytest.raises(ValueError, match="already registered"):
        pool.add(WorkerRole.DECODE, "http://127.0.0.1:9001/")
    with pytest.raises(ValueError, match="url"):
        pool.add(WorkerRole.DECODE, "ftp://x")


def test_drain_waits_for_in_flight_then_remove():
    pool = make_pool(WorkerRole.DECODE, WorkerRole.DECODE)
    w1, w2 = pool.all()
    pool.acquire(w1)
    with pytest.raises(ValueError, match="drain it first"):
        pool.remove("w1")
    assert pool.drain("w1").state is WorkerState.DRAINING
    assert pool.candidates([WorkerRole.DECODE]) == [w2]
    pool.release(w1)
    assert w1.state is WorkerState.DRAINED
    pool.remove("w1")
    assert pool.all() == [w2]
    assert pool.drain("w2").state is WorkerState.DRAINED  # idle: drained at once
    with pytest.raises(KeyError):
        pool.get("w1")


def test_unhealthy_worker_leaves_candidates_until_marked_back():
    pool = make_pool(WorkerRole.DECODE, WorkerRole.AGGREGATED)
    w1, w2 = pool.all()
    pool.mark(w1, healthy=False)
    assert pool.candidates([WorkerRole.DECODE, WorkerRole.AGGREGATED]) == [w2]
    assert w1.failures == 1
    pool.mark(w1, healthy=True)
    assert pool.candidates([WorkerRole.DECODE, WorkerRole.AGGREGATED], exclude=["w2"]) == [w1]


# --- routing ------------------------------------------------------------------------------


def test_prefix_overlap_stops_at_first_missing_block():
    assert prefix_overlap([1, 2, 3, 4], {1, 2, 4}) == 2
    assert prefix_overlap([1, 2], set()) == 0
    assert prefix_overlap([], {1}) == 0


def test_prefill_prefers_overlap_then_load():
    pool = make_pool(WorkerRole.PREFILL, WorkerRole.PREFILL, WorkerRole.PREFILL)
    w1, w2, w3 = pool.all()
    published = {"w1": {b"a"}, "w2": {b"a", b"b"}, "w3": {b"a", b"b"}}
    for _ in range(2):
        pool.acquire(w2)
    assert choose_prefill(pool.all(), [b"a", b"b", b"c"], published.__getitem__) is w3
    pool.acquire(w3)
    pool.acquire(w3)
    pool.acquire(w3)
    assert choose_prefill(pool.all(), [b"a", b"b", b"c"], published.__getitem__) is w2
    # No hashes: pure load (w1 idle).
    assert choose_prefill(pool.all(), [], published.__getitem__) is w1
    assert choose_prefill([], [b"a"]) is None


def test_decode_choice_by_in_flight_then_turns():
    pool = make_pool(WorkerRole.DECODE, WorkerRole.DECODE)
    w1, w2 = pool.all()
    assert choose_by_load(pool.all()) is w1
    pool.acquire(w1)
    assert choose_by_load(pool.all()) is w2
    pool.release(w1)  # both idle, w1 has taken one request: w2's turn
    assert choose_by_load(pool.all()) is w2
    assert choose_by_load([]) is None


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=6))
def test_choice_is_least_in_flight(loads):
    pool = make_pool(*[WorkerRole.DECODE] * len(loads))
    for worker, (in_flight, done) in zip(pool.all(), loads):
        for _ in range(done + in_flight):
            pool.acquire(worker)
        for _ in range(done):
            pool.release(worker)
    chosen = choose_by_load(pool.all())
    assert chosen.in_flight == min(w.in_flight for w in pool.all())
    assert choose_prefill(pool.all(), [b"x"]) is chosen


# --- stats --------------------------------------------------------------------------------


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0


def test_stats_json_and_prometheus():
    pool = make_pool(WorkerRole.PREFILL, WorkerRole.DECODE)
    stats = RouterStats(window=3)
    stats.requests = 2
    stats.count_route("w1", Hop.PREFILL)
    stats.count_route("w2", Hop.DECODE)
    stats.count_error(ErrorKind.KV_PARAMS_MISSING)
    for seconds in (0.1, 0.2, 0.3, 0.4):
        stats.record_ttft(seconds)
    stats.record_prefill(0.05)
    snapshot = stats.as_json(pool.all())
    assert snapshot["routing"] == {"w1": {"prefill": 1}, "w2": {"decode": 1}}
    assert snapshot["transfer_failures"] == 1
    assert snapshot["ttft_s"] == {"count": 3, "p50": 0.3, "p99": 0.4}
    assert snapshot["itl_s"]["p50"] is None
    assert snapshot["prefill_s"] == {"count": 1, "p50": 0.05, "p99": 0.05}
    assert [w["id"] for w in snapshot["workers"]] == ["w1", "w2"]
    text = stats.prometheus(pool.all())
    assert "kvbm_router_requests_total 2\n" in text
    assert 'kvbm_router_routed_total{worker="w2",hop="decode"} 1' in text
    assert 'kvbm_router_errors_total{kind="kv_params_missing"} 1' in text
    assert 'kvbm_router_ttft_seconds{quantile="0.5"} 0.300000' in text
    assert "kvbm_router_prefill_seconds_count 1\n" in text
    assert 'kvbm_router_worker_healthy{worker="w1",state="active"} 1' in text


def test_worker_stats_render_as_json_entries_and_errors():
    pool = make_pool(WorkerRole.PREFILL, WorkerRole.DECODE)
    stats = RouterStats(window=3)
    replies = {
        "w1": WorkerReply(True, '{"tiers": {"g2": {"hits": 3}}}'),
        "w2": WorkerReply(False, "http://127.0.0.1:1/stats: ConnectError refused"),
    }
    workers = stats.as_json(pool.all(), replies)["workers"]
    assert workers[0]["block_stats"] == {"tiers": {"g2": {"hits": 3}}}
    assert workers[1]["block_stats"] == {"error": "http://127.0.0.1:1/stats: ConnectError refused"}
    assert stats.as_json(pool.all())["workers"][0]["block_stats"] is None


# --- workers' stats ---------------------------------------------------------------------

WORKER_METRICS = """# HELP kvbm_hits_total Looked-up blocks served by the tier.
# TYPE kvbm_hits_total counter
kvbm_hits_total{tier="g2"} 4
# TYPE kvbm_pending_jobs gauge
kvbm_pending_jobs 0
"""


def test_merged_worker_metrics_keep_one_header_per_family_and_label_every_sample():
    lines = merge_worker_metrics({"w1": WORKER_METRICS, "w2": WORKER_METRICS.replace(" 4\n", " 7\n")})
    assert lines == [
        "# HELP kvbm_hits_total Looked-up blocks served by the tier.",
        "# TYPE kvbm_hits_total counter",
        'kvbm_hits_total{worker="w1",tier="g2"} 4',
        'kvbm_hits_total{worker="w2",tier="g2"} 7',
        "# TYPE kvbm_pending_jobs gauge",
        'kvbm_pending_jobs{worker="w1"} 0',
        'kvbm_pending_jobs{worker="w2"} 0',
    ]


def test_fetch_worker_stats_asks_only_live_workers_and_reports_failures():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9101:
            return httpx.Response(200, text='{"tiers": {}}')
        if request.url.port == 9102:
            return httpx.Response(500)
        raise httpx.ConnectError("refused", request=request)

    pool = WorkerPool()
    for port in (9101, 9102, 9103):
        pool.add(WorkerRole.DECODE, f"http://127.0.0.1:{port - 100}", f"http://127.0.0.1:{port}")
    pool.add(WorkerRole.DECODE, "http://127.0.0.1:9004")  # no stats endpoint: not asked
    pool.drain("w3")  # drained: still up, still asked

    async def fetch():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await fetch_worker_stats(client, pool.all(), "/stats", timeout_s=1.0)

    replies = asyncio.run(fetch())
    assert replies == {
        "w1": WorkerReply(True, '{"tiers": {}}'),
        "w2": WorkerReply(False, "http://127.0.0.1:9102/stats: HTTP 500"),
        "w3": WorkerReply(False, "http://127.0.0.1:9103/stats: ConnectError refused"),
    }
    text = RouterStats(window=3).prometheus(pool.all(), replies)
    assert 'kvbm_router_worker_stats_up{worker="w1"} 1' in text
    assert 'kvbm_router_worker_stats_up{worker="w2"} 0' in text


# --- launched workers -----------------------------------------------------------------------


class FakeProcess:
    """A launched worker that comes up after ``polls`` polls (or fails at its first)."""

    def __init__(self, port: int, polls: int = 1, fail: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.stats_url = f"http://127.0.0.1:{port + 1}"
        self.polls, self.fail, self.stopped = polls, fail, False
        self.code: int | None = None

    def poll_start(self) -> bool:
        if self.fail:
            self.stopped = True
            raise RuntimeError(self.fail)
        self.polls -= 1
        return self.polls <= 0

    def stop(self) -> None:
        self.stopped = True

    def exit_code(self) -> int | None:
        return self.code


class FakeLauncher:
    def __init__(self, **process_args) -> None:
        self.launched: dict[str, FakeProcess] = {}
        self._args = process_args

    def __call__(self, role: WorkerRole, worker_id: str) -> FakeProcess:
        process = FakeProcess(9500 + 2 * len(self.launched), **self._args)
        self.launched[worker_id] = process
        return process


def test_pool_launch_lifecycle():
    pool = WorkerPool()
    launcher = FakeLauncher()
    worker = pool.launch(WorkerRole.DECODE, launcher)
    assert (worker.id, worker.state, worker.stats_url) == ("w1", WorkerState.STARTING, "http://127.0.0.1:9501")
    assert launcher.launched["w1"] is worker.process and worker.as_json()["launched"]
    assert pool.candidates([WorkerRole.DECODE]) == []
    assert pool.started(worker) and pool.candidates([WorkerRole.DECODE]) == [worker]
    pool.drain("w1")
    pool.stopped(worker)
    assert worker.state is WorkerState.STOPPED
    # A stopped worker's port may come back with a new worker.
    assert pool.add(WorkerRole.DECODE, worker.url).id == "w2"
    pool.remove("w1")
    starting = pool.launch(WorkerRole.PREFILL, launcher)
    assert pool.drain(starting.id).state is WorkerState.DRAINED  # drained before it came up
    assert not pool.started(starting)
    failed = pool.launch(WorkerRole.PREFILL, launcher)
    pool.failed(failed, "exited with 1")
    assert (failed.state, failed.error) == (WorkerState.FAILED, "exited with 1")
    pool.remove(failed.id)


def admin_client(launcher=None) -> TestClient:
    """A client of a router app (use it in ``with``, which runs the app's lifespan)."""
    config = make_config(health_interval_s=3600.0, request_timeout_s=30.0)
    return TestClient(Router(config, launcher=launcher).app)


def poll_state(client: TestClient, worker_id: str, wanted: str) -> dict:
    for _ in range(200):
        worker = next(w for w in client.get("/admin/workers").json() if w["id"] == worker_id)
        if worker["state"] == wanted:
            return worker
        time.sleep(0.01)
    raise AssertionError(f"{worker_id} stayed {worker['state']}, wanted {wanted}")


def test_admin_launch_joins_once_healthy_and_drain_stops_it():
    launcher = FakeLauncher(polls=2)
    with admin_client(launcher) as client:
        reply = client.post("/admin/workers", json={"role": "decode"})
        assert reply.status_code == 202
        assert reply.json() | {"id": "w1", "state": "starting", "launched": True} == reply.json()
        assert client.get("/health").json()["workers_up"] == 0
        poll_state(client, "w1", "active")
        assert client.get("/health").json()["workers_up"] == 1
        drained = client.post("/admin/workers/w1/drain")
        assert drained.status_code == 200 and drained.json()["state"] == "stopped"
        assert launcher.launched["w1"].stopped
        assert client.delete("/admin/workers/w1").status_code == 200


def test_admin_launch_that_fails_is_listed_with_its_reason():
    with admin_client(FakeLauncher(fail="worker w1 (prefill) exited with 1")) as client:
        assert client.post("/admin/workers", json={"role": "prefill"}).status_code == 202
        assert poll_state(client, "w1", "failed")["error"] == "worker w1 (prefill) exited with 1"
        assert client.delete("/admin/workers/w1").status_code == 200


def test_admin_launch_without_launcher_or_with_bad_bodies_is_400():
    with admin_client() as client:
        reply = client.post("/admin/workers", json={"role": "decode"})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "no_launcher"
        assert "serve command" in reply.json()["error"]["message"]
        for body in (
            {"role": "decode", "stats_url": "http://127.0.0.1:1"},
            {"role": "decode", "url": "http://127.0.0.1:1", "port": 3},
            {"url": "x"},
            [1],
        ):
            reply = client.post("/admin/workers", json=body)
            assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_worker", body
        added = client.post(
            "/admin/workers", json={"role": "decode", "url": "http://127.0.0.1:1/", "stats_url": "http://127.0.0.1:2"}
        )
        assert added.status_code == 201
        assert (added.json()["url"], added.json()["stats_url"]) == ("http://127.0.0.1:1", "http://127.0.0.1:2")


# --- failures in forwarding ---------------------------------------------------------------


def forward_once(answer, *roles: WorkerRole, stream: bool = False, clock=time.monotonic):
    """Forwards one completion over workers answering with ``answer(request)``; returns the
    response (or the RequestError), the pool and the stats."""
    pool, stats = make_pool(*roles), RouterStats(window=8)
    body = parse_request(
        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1, "stream": stream}).encode(),
        Endpoint.COMPLETIONS,
        make_config(),
    )

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            forwarder = Forwarder(pool, stats, client, clock=clock)
            try:
                response = await forwarder.forward(Endpoint.COMPLETIONS, body, time.monotonic())
                if isinstance(response, StreamingResponse):  # consume it so the worker is released
                    response.body = b"".join([chunk async for chunk in response.body_iterator])
                return response
            except RequestError as error:
                return error
            finally:
                await forwarder.close()  # the handoff releases it sent have been answered

    return asyncio.run(run()), pool, stats


def completion_answer(lost: set[str], failing_health: set[str]):
    """Workers on ports 9000+: the first completion sent to a port in ``lost`` loses its
    connection; ``/health`` fails on ports in ``failing_health``."""
    seen: set[int] = set()

    def answer(request: httpx.Request) -> httpx.Response:
        port = request.url.port
        if request.url.path == "/health":
            if str(port) in failing_health:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200, json={})
        if str(port) in lost and port not in seen:
            seen.add(port)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response", request=request)
        if json.loads(request.content).get("stream"):
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                stream=httpx.ByteStream(f"data: from {port}\n\n".encode()),
            )
        return httpx.Response(200, json={"choices": [{"text": f"from {port}"}]})

    return answer


@pytest.mark.parametrize("stream", [False, True])
def test_a_lost_connection_to_a_healthy_worker_is_retried_and_keeps_it_in_rotation(stream):
    reply, pool, stats = forward_once(completion_answer({"9000"}, set()), WorkerRole.DECODE, stream=stream)
    assert reply.status_code == 200 and b"from 9000" in reply.body
    assert [w.healthy for w in pool.all()] == [True]
    assert stats.retries == 1 and stats.errors[ErrorKind.WORKER_FAILED] == 1


def test_a_lost_connection_to_a_worker_failing_health_takes_it_out():
    reply, pool, _ = forward_once(completion_answer({"9000"}, {"9000"}), WorkerRole.DECODE, WorkerRole.DECODE)
    assert reply.status_code == 200 and b"from 9001" in reply.body
    assert [w.healthy for w in pool.all()] == [False, True]


def test_a_5xx_takes_a_worker_out_even_when_its_health_answers():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health" or request.url.port == 9001:
            return httpx.Response(200, json={"choices": [{"text": "ok"}]})
        return httpx.Response(500)

    reply, pool, _ = forward_once(answer, WorkerRole.DECODE, WorkerRole.DECODE)
    assert reply.status_code == 200
    assert [w.healthy for w in pool.all()] == [False, True]


class TickingStream(httpx.AsyncByteStream):
    """A worker's SSE stream whose chunks come a second apart on ``clock``."""

    def __init__(self, clock: FakeClock, chunks: list[bytes]) -> None:
        self._clock, self._chunks = clock, chunks

    async def __aiter__(self):
        for chunk in self._chunks:
            self._clock.advance(1.0)
            yield chunk


def test_every_chunk_a_worker_streams_is_recorded_as_its_progress():
    clock = FakeClock()
    chunks = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=TickingStream(clock, chunks))

    reply, pool, _ = forward_once(answer, WorkerRole.DECODE, stream=True, clock=clock)
    assert reply.status_code == 200 and reply.body == b"".join(chunks)
    assert pool.all()[0].last_progress == 103.0  # the last chunk's time, not the first's


@pytest.mark.parametrize("status, progressed", [(200, True), (400, True), (500, False)])
def test_an_answer_below_500_is_progress_and_a_5xx_is_not(status, progressed):
    answer = lambda request: httpx.Response(status, json={})  # noqa: E731
    _, pool, _ = forward_once(answer, WorkerRole.DECODE, clock=FakeClock())
    assert pool.all()[0].last_progress == (100.0 if progressed else None)


def test_a_timeout_does_not_take_out_the_last_decode_worker_nor_retry_on_it():
    reply, pool, stats = forward_once(raises(httpx.ReadTimeout), WorkerRole.DECODE)
    assert isinstance(reply, RequestError) and (reply.status, reply.code) == (502, "worker_failed")
    assert [w.healthy for w in pool.all()] == [True]
    assert stats.retries == 0 and pool.all()[0].routed == 1


def test_a_timeout_takes_a_worker_out_when_another_can_take_its_requests():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9000:
            raise httpx.ReadTimeout("injected", request=request)
        return httpx.Response(200, json={"choices": [{"text": "from 9001"}]})

    reply, pool, stats = forward_once(answer, WorkerRole.DECODE, WorkerRole.AGGREGATED)
    assert reply.status_code == 200 and b"from 9001" in reply.body
    assert [w.healthy for w in pool.all()] == [False, True] and stats.retries == 1


# --- handoffs no decode took ---------------------------------------------------------------

LAST_HASH = BlockHash(bytes(range(16)))


# The prefill's grant of those two blocks: a release names its lease.
GRANT = BlockGrant(
    AgentName("prefill-0/ab12"),
    LeaseId(7),
    Tier.G1,
    np.arange(2),
    np.zeros(2, dtype=np.uint64),
    (BlockHash(bytes(16)), LAST_HASH),
)


class FakePrefillSideChannel:
    """A real side channel that only answers ``release``; ``log`` sees releases in order."""

    def __init__(self, log: list) -> None:
        self._log, self._lock = log, threading.Lock()
        handlers = exchange.server_handlers(self._unused, self._unused, self._release)
        self.server = SideChannelServer("127.0.0.1", 0, handlers, timeout_s=5.0)

    @property
    def releases(self) -> list[tuple[BlockHash, ...]]:
        with self._lock:
            return [entry[1] for entry in self._log if entry[0] == "release"]

    @property
    def leases(self) -> list[int | None]:
        with self._lock:
            return [entry[2] for entry in self._log if entry[0] == "release"]

    def _release(self, hashes: tuple[BlockHash, ...], lease_id: int | None = None, agent: str | None = None) -> int:
        with self._lock:
            self._log.append(("release", hashes, lease_id))
        return 1

    def _unused(self, *args):
        raise ValueError("this fake answers only release")


@pytest.fixture
def log() -> list:
    """What the fake decode workers and the fake prefill's side channel saw, in order."""
    return []


@pytest.fixture
def side_channel(log):
    channel = FakePrefillSideChannel(log)
    yield channel
    channel.server.close()


def disaggregated_answer(source: str, decode_answers: dict[int, httpx.Response | None], log: list):
    """The prefill (port 9000) hands off two blocks held at ``source``; a decode worker on
    port P answers ``decode_answers[P]`` (None: the connection is refused)."""

    def answer(request: httpx.Request) -> httpx.Response:
        port = request.url.port
        if port == 9000:
            params = Handoff(source, 2, LAST_HASH, GRANT).to_params()
            return httpx.Response(200, json={"choices": [{"text": "a"}], "kv_transfer_params": params})
        if request.url.path == "/health":
            return httpx.Response(200, json={})
        sent = json.loads(request.content)["kv_transfer_params"]["kvbm"]
        log.append(("decode", port, sent["last_hash"]))
        reply = decode_answers[port]
        if reply is None:
            raise httpx.ConnectError("refused", request=request)
        return reply

    return answer


def vllm_error(status: int, message: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    )


def ok_answer(stream: bool) -> httpx.Response:
    if stream:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=httpx.ByteStream(b"data: decoded\n\n")
        )
    return httpx.Response(200, json={"choices": [{"text": "decoded"}]})


@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_refusal_releases_the_prefill_handoff_once(stream, side_channel, log):
    too_long = "This model's maximum context length is 64 tokens; your prompt has 80"
    answer = disaggregated_answer(side_channel.server.address, {9001: vllm_error(400, too_long)}, log)
    reply, pool, stats = forward_once(answer, WorkerRole.PREFILL, WorkerRole.DECODE, stream=stream)
    assert reply.status_code == 400
    assert json.loads(reply.body)["error"]["message"] == too_long
    assert log == [("decode", 9001, LAST_HASH.hex()), ("release", (LAST_HASH,), GRANT.lease_id)]
    assert (stats.handoffs_released, stats.handoff_release_failures) == (1, 0)
    assert stats.as_json(pool.all())["handoffs_released"] == 1
    assert "kvbm_router_handoffs_released_total 1\n" in stats.prometheus(pool.all())
    assert stats.errors[ErrorKind.UPSTREAM_4XX] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_that_accepts_pulls_and_releases_itself(stream, side_channel, log):
    answer = disaggregated_answer(side_channel.server.address, {9001: ok_answer(stream)}, log)
    reply, _, stats = forward_once(answer, WorkerRole.PREFILL, WorkerRole.DECODE, stream=stream)
    assert reply.status_code == 200 and b"decoded" in reply.body
    assert side_channel.releases == []
    assert (stats.disaggregated, stats.handoffs_released, stats.handoff_release_failures) == (1, 0, 0)


@pytest.mark.parametrize(
    "second, status, releases",
    [
        (None, 502, [(LAST_HASH,)]),  # both refuse the connection: given up
        (httpx.Response(500), 502, [(LAST_HASH,)]),
        ("ok", 200, []),  # the retry took it
    ],
)
def test_a_failed_decode_hop_releases_only_once_the_router_gives_up(second, status, releases, side_channel, log):
    decodes = {9001: None, 9002: ok_answer(False) if second == "ok" else second}
    answer = disaggregated_answer(side_channel.server.address, decodes, log)
    reply, _, stats = forward_once(answer, WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.DECODE)
    assert reply.status == status if isinstance(reply, RequestError) else reply.status_code == status
    assert [entry[:2] for entry in log[:2]] == [("decode", 9001), ("decode", 9002)]
    assert side_channel.releases == releases and len(log) == 2 + len(releases)
    assert (stats.retries, stats.handoffs_released) == (1, len(releases))


def test_a_client_gone_before_the_decode_answered_releases_the_handoff(side_channel, log):
    pool, stats = make_pool(WorkerRole.PREFILL, WorkerRole.DECODE), RouterStats(window=8)
    decode_reached = asyncio.Event()
    answer_sync = disaggregated_answer(side_channel.server.address, {}, log)

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9000:
            return answer_sync(request)
        decode_reached.set()
        await asyncio.Event().wait()  # the decode never answers
        raise AssertionError("unreachable")

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            forwarder = Forwarder(pool, stats, client)
            body = {"model": MODEL, "prompt": "x", "max_tokens": 4}
            request = asyncio.create_task(forwarder.forward(Endpoint.COMPLETIONS, body, time.monotonic()))
            await decode_reached.wait()
            request.cancel()  # what the server does with a request whose client went away
            with pytest.raises(asyncio.CancelledError):
                await request
            await forwarder.close()

    asyncio.run(run())
    assert side_channel.releases == [(LAST_HASH,)]
    assert stats.handoffs_released == 1
    assert [w.in_flight for w in pool.all()] == [0, 0]


def test_a_release_the_prefill_does_not_answer_is_counted_and_the_client_still_gets_its_answer(log):
    with socket.socket() as closed:  # a port nobody listens on once this closes
        closed.bind(("127.0.0.1", 0))
        source = f"127.0.0.1:{closed.getsockname()[1]}"
    answer = disaggregated_answer(source, {9001: vllm_error(400, "bad temperature")}, log)
    reply, _, stats = forward_once(answer, WorkerRole.PREFILL, WorkerRole.DECODE)
    assert reply.status_code == 400 and json.loads(reply.body)["error"]["message"] == "bad temperature"
    assert (stats.handoffs_released, stats.handoff_release_failures) == (0, 1)


# --- health --------------------------------------------------------------------------------


def raises(error_type: type[httpx.HTTPError]):
    def answer(request: httpx.Request) -> httpx.Response:
        raise error_type("injected", request=request)

    return answer


@pytest.mark.parametrize(
    "answer, expected",
    [
        (lambda request: httpx.Response(200), Health.UP),
        (lambda request: httpx.Response(503), Health.DOWN),
        (raises(httpx.ConnectError), Health.DOWN),
        (raises(httpx.ReadTimeout), Health.SLOW),
    ],
)
def test_a_health_check_tells_late_from_down(answer, expected):
    worker = make_pool(WorkerRole.DECODE).all()[0]

    async def check() -> Health:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await check_health(client, worker, timeout=1.0)

    assert asyncio.run(check()) is expected


def test_late_probes_take_a_worker_out_only_in_a_row_and_a_refusal_at_once():
    pool = make_pool(WorkerRole.DECODE, WorkerRole.DECODE)
    busy, dead = pool.all()
    verdicts = ProbeVerdicts(pool, slow_to_eject=3)
    for health in (Health.SLOW, Health.SLOW, Health.UP, Health.SLOW, Health.SLOW):
        verdicts.apply(busy, health)
        assert busy.healthy  # never three late answers in a row
    verdicts.apply(busy, Health.SLOW)
    assert not busy.healthy
    verdicts.apply(busy, Health.SLOW)
    assert not busy.healthy  # still out until it answers
    verdicts.apply(busy, Health.UP)
    assert busy.healthy
    verdicts.apply(dead, Health.DOWN)
    assert not dead.healthy
    assert [w.id for w in pool.candidates((WorkerRole.DECODE,))] == [busy.id]


def test_a_launched_worker_whose_process_ended_is_failed_with_its_status():
    pool = WorkerPool()
    launcher = FakeLauncher()
    worker = pool.launch(WorkerRole.DECODE, launcher)
    pool.started(worker)
    added = pool.add(WorkerRole.DECODE, "http://127.0.0.1:9700")  # not launched: nothing to poll
    verdicts = ProbeVerdicts(pool)
    assert not verdicts.process_ended(worker) and not verdicts.process_ended(added)
    launcher.launched[worker.id].code = -9
    assert verdicts.process_ended(worker)
    assert (worker.state, worker.healthy, worker.error) == (
        WorkerState.FAILED,
        False,
        "its process exited with status -9",
    )
    assert pool.candidates([WorkerRole.DECODE]) == [added]
    pool.remove(worker.id)  # a failed worker can be forgotten


def test_late_probes_keep_a_worker_whose_requests_make_progress():
    pool = make_pool(WorkerRole.DECODE, WorkerRole.DECODE)
    busy, idle = pool.all()
    clock = FakeClock()
    verdicts = ProbeVerdicts(pool, slow_to_eject=3, clock=clock)
    for _ in range(10):
        clock.advance(1.0)
        pool.progressed(busy, clock())  # a chunk of one of its streams, between two probes
        clock.advance(3.0)
        verdicts.apply(busy, Health.SLOW)
        verdicts.apply(idle, Health.UP)
        assert busy.healthy
    # Progress only counts until the next verdict: then three late answers take it out.
    for healthy in (True, True, False):
        clock.advance(4.0)
        verdicts.apply(busy, Health.SLOW)
        assert busy.healthy is healthy
    # Its streams moving again bring it back, late answer and all.
    pool.progressed(busy, clock())
    clock.advance(4.0)
    verdicts.apply(busy, Health.SLOW)
    assert busy.healthy


def test_the_last_worker_that_can_take_a_hop_is_never_taken_out_for_lateness():
    pool = make_pool(WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.AGGREGATED)
    prefill, decode, aggregated = pool.all()
    verdicts = ProbeVerdicts(pool, slow_to_eject=3)
    for probes in range(1, 11):  # no progress at all
        for worker in pool.all():
            verdicts.apply(worker, Health.SLOW)
        # The aggregated worker can take the decode worker's hops; nobody takes the prefill's.
        assert [w.healthy for w in pool.all()] == [True, probes < 3, True]
    assert pool.candidates([WorkerRole.PREFILL]) == [prefill]
    assert pool.candidates(DECODE_ROLES) == [aggregated]
    # Down is down, also for the last one; the decode worker, out only for lateness, is then
    # the last that can take a final hop, and its next late answer brings it back.
    verdicts.apply(prefill, Health.DOWN)
    verdicts.apply(aggregated, Health.DOWN)
    assert pool.candidates(DECODE_ROLES) == []
    verdicts.apply(decode, Health.SLOW)
    assert [w.healthy for w in pool.all()] == [False, True, False]


def test_an_aggregated_pool_keeps_its_last_worker_through_late_probes():
    pool = make_pool(WorkerRole.AGGREGATED)
    verdicts = ProbeVerdicts(pool, slow_to_eject=1)
    for _ in range(5):
        verdicts.apply(pool.all()[0], Health.SLOW)
    assert pool.all()[0].healthy


def test_a_worker_out_for_lateness_comes_back_when_its_peer_drains_but_not_one_out_for_failing():
    pool = make_pool(WorkerRole.DECODE, WorkerRole.DECODE)
    late, peer = pool.all()
    verdicts = ProbeVerdicts(pool, slow_to_eject=3)
    for _ in range(3):
        verdicts.apply(late, Health.SLOW)
    assert not late.healthy
    pool.acquire(peer)
    pool.drain(peer.id)  # draining: it takes no new request
    verdicts.apply(late, Health.SLOW)
    assert late.healthy and pool.candidates(DECODE_ROLES) == [late]
    for out in (lambda: verdicts.apply(late, Health.DOWN), lambda: pool.mark(late, False, "answered HTTP 500")):
        out()
        verdicts.apply(late, Health.SLOW)
        assert not late.healthy  # only an answer brings it back
        verdicts.apply(late, Health.UP)
        assert late.healthy


# --- admission queue -----------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 1}


async def until(condition) -> None:
    """Lets the event loop run until ``condition()`` holds (no clock involved)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def answering(seen: list[str]):
    """Workers that answer every request, logging ``port path`` in ``seen``."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.port} {request.url.path}")
        answer = {"choices": [{"text": f"from {request.url.port}"}]}
        if request.url.port == 9000:  # the prefill worker, when there is one
            answer["kv_transfer_params"] = {"do_remote_prefill": True}
        return httpx.Response(200, json=answer)

    return answer


def queued_forward(pool: WorkerPool, arrive, seen: list[str], timeout_s: float = 60.0):
    """Forwards one completion that must wait in a queue of 4; once it waits, ``arrive()``
    makes a worker able to take it. Returns the response and the stats."""
    stats = RouterStats(window=8)
    admission = AdmissionQueue(pool, stats, size=4, timeout_s=timeout_s)

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answering(seen))) as client:
            forwarder = Forwarder(pool, stats, client, admission=admission)
            forwarded = forwarder.forward(Endpoint.COMPLETIONS, COMPLETION, time.monotonic())
            request = asyncio.create_task(forwarded)
            await until(lambda: admission.depth == 1)
            assert seen == [] and stats.queue_depth == 1  # nothing sent while it waits
            arrive()
            return await request

    reply = asyncio.run(run())
    assert (stats.queued, stats.queue_depth, admission.depth) == (1, 0, 0)
    assert stats.errors[ErrorKind.NO_WORKER] == 0
    return reply, stats


@pytest.mark.parametrize("comes", ["back in rotation", "added", "started"])
def test_a_queued_request_proceeds_once_a_worker_can_take_it(comes):
    pool = WorkerPool()
    if comes == "back in rotation":
        worker = pool.add(WorkerRole.DECODE, "http://127.0.0.1:9001")
        pool.mark(worker, False)
        arrive = lambda: pool.mark(worker, True)  # noqa: E731
    elif comes == "started":
        worker = pool.launch(WorkerRole.DECODE, FakeLauncher())
        arrive = lambda: pool.started(worker)  # noqa: E731
    else:  # the pool was empty
        arrive = lambda: pool.add(WorkerRole.DECODE, "http://127.0.0.1:9001")  # noqa: E731
    seen: list[str] = []
    reply, _ = queued_forward(pool, arrive, seen)
    port = pool.all()[0].url.rsplit(":", 1)[1]
    assert seen == [f"{port} /v1/completions"]
    assert reply.status_code == 200 and json.loads(reply.body)["choices"][0]["text"] == f"from {port}"


def test_a_request_waits_for_a_decode_worker_before_its_prefill_hop():
    pool = make_pool(WorkerRole.PREFILL, WorkerRole.DECODE)
    _, decode = pool.all()
    pool.mark(decode, False)
    seen: list[str] = []
    reply, stats = queued_forward(pool, lambda: pool.mark(decode, True), seen)
    assert reply.status_code == 200
    assert seen == ["9000 /v1/completions", "9001 /v1/completions"] and stats.disaggregated == 1


def test_a_full_queue_refuses_at_once_naming_its_size():
    pool, stats = make_pool(WorkerRole.DECODE), RouterStats(window=8)
    draining = pool.all()[0]
    pool.acquire(draining)
    pool.drain(draining.id)
    admission = AdmissionQueue(pool, stats, size=2, timeout_s=60.0)

    async def run() -> RequestError:
        waiting = [asyncio.create_task(admission.wait(DECODE_ROLES)) for _ in range(2)]
        await until(lambda: admission.depth == 2)
        with pytest.raises(RequestError) as refused:
            await admission.wait(DECODE_ROLES)
        for task in waiting:  # their clients go away: they leave the queue
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        return refused.value

    error = asyncio.run(run())
    assert (error.status, error.code, error.type) == (503, "queue_full", "service_unavailable")
    assert error.message == (
        "no decode or aggregated worker can take this request (w1 draining), "
        "and the admission queue is full (2 waiting); retry later"
    )
    assert (stats.queued, stats.queue_rejections, stats.queue_timeouts) == (2, 1, 0)
    assert (admission.depth, stats.queue_depth, stats.errors[ErrorKind.NO_WORKER]) == (0, 0, 1)


def test_a_request_that_waits_past_the_timeout_gets_a_503_naming_the_wait():
    pool, stats = make_pool(WorkerRole.DECODE, WorkerRole.AGGREGATED), RouterStats(window=8)
    out, draining = pool.all()
    pool.mark(out, False)
    pool.acquire(draining)
    pool.drain(draining.id)
    admission = AdmissionQueue(pool, stats, size=4, timeout_s=0.05)

    async def run() -> RequestError:
        waiting = asyncio.create_task(admission.wait(DECODE_ROLES))
        await until(lambda: admission.depth == 1)
        pool.add(WorkerRole.PREFILL, "http://127.0.0.1:9100")  # cannot take a final hop
        with pytest.raises(RequestError) as gave_up:
            await waiting
        return gave_up.value

    error = asyncio.run(run())
    assert (error.status, error.code, error.type) == (503, "no_worker", "service_unavailable")
    assert error.message == (
        "waited 0.05 s for a healthy decode or aggregated worker; none came (w1 out of rotation, w2 draining)"
    )
    assert (stats.queued, stats.queue_timeouts, stats.queue_rejections) == (1, 1, 0)
    assert (stats.queue_depth, stats.errors[ErrorKind.NO_WORKER]) == (0, 1)


@pytest.mark.parametrize(
    "queue, message, counter",
    [
        (
            {"queue_size": 0},
            "no decode or aggregated worker can take this request (none registered), "
            "and this router lets no request wait (queue_size 0)",
            "queue_rejections",
        ),
        (
            {"queue_timeout_s": 0.05},
            "waited 0.05 s for a healthy decode or aggregated worker; none came (none registered)",
            "queue_timeouts",
        ),
    ],
)
def test_the_router_answers_an_unplaceable_request_with_a_503_and_counts_it(queue, message, counter):
    with TestClient(Router(make_config(health_interval_s=3600.0, **queue)).app) as client:
        reply = client.post("/v1/completions", json=COMPLETION)
        assert reply.status_code == 503
        assert reply.json() == {
            "error": {"message": message, "type": "service_unavailable", "code": "no_worker", "param": None}
        }
        snapshot = client.get("/stats").json()
        assert snapshot[counter] == 1 and snapshot["queue_depth"] == 0
        assert snapshot["queued"] == int(counter == "queue_timeouts")
        assert snapshot["errors"]["no_worker"] == 1
        metrics = client.get("/metrics").text
        assert f"kvbm_router_{counter}_total 1\n" in metrics
        assert "kvbm_router_queue_depth 0\n" in metrics
