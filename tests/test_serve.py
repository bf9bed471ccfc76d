"""The serve command on real processes (127.0.0.1): workers with kvbm's connector behind the router.

The command-line tests run ``python -m kvbm.serving serve`` and check, through an environment
marker every child inherits, that no process outlives it. The stack tests share one stack
(1 prefill + 1 decode, float32) and one plain vLLM server as the aggregated reference, started
together; the admin test adds a decode worker and drains the original one, the last test
kills the prefill worker, so each test finds its workers by role, not by id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import weakref
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import CHAT_TEMPLATE, chat_body, completion_body, post, text_of

from kvbm.serving.__main__ import build_parser, router_fields
from kvbm.serving.router_config import RouterConfig
from kvbm.serving.serve import ServeOptions, ServeStack, connector_config, cpu_groups, signals_interrupt
from kvbm.serving.server_process import VLLMServer, parse_cpus
from kvbm.serving.sse import data_of
from kvbm.serving.vllm_settings import EngineSettings
from kvbm.serving.workers import WorkerRole

pytestmark = pytest.mark.slow

MODEL = "tiny"
# Several 32-token blocks each, so the decode worker has blocks to pull.
LONG_PROMPTS = [
    "def main(argv):\n" + "    parser.add_argument('--flag', default=None)\n" * 8,
    "The quick brown fox jumps over the lazy dog. " * 16,
]
POLLS = 1200
POLL_S = 0.25


# --- without servers ----------------------------------------------------------------------


def test_each_worker_gets_the_connector_with_its_own_id_and_stats_port():
    assert connector_config("w3", 4567, 4568) == {
        "kv_connector": "KVBMConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"remote": {"worker": "w3", "side_channel_port": 4568}, "stats_port": 4567},
    }


def test_cpu_groups_give_each_worker_its_own_cores():
    assert cpu_groups(2, [0, 1]) == ["0", "1"]
    assert cpu_groups(3, [0, 1]) == ["0", "1"]  # more workers than CPUs: groups repeat
    assert cpu_groups(1, [0, 1]) == ["0,1"]
    assert cpu_groups(3, list(range(8))) == ["0,1", "2,3", "4,5"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_dropped_inside_a_finalizer_still_stops_the_start():
    """Python drops an exception raised in a weakref callback; a signal handled there must not
    be lost (CI once saw serve ignore its SIGTERM and start up fully)."""

    class Collected:
        pass

    def on_collect(_):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):  # the handler runs at a bytecode boundary in here
            pass

    never_starts = type("W", (), {"process": type("P", (), {"poll_start": lambda self: False})()})()
    with signals_interrupt() as interrupted:
        collected = Collected()
        reference = weakref.ref(collected, on_collect)
        del collected  # the callback's KeyboardInterrupt is printed and dropped
        assert reference() is None and interrupted.is_set()
        with pytest.raises(KeyboardInterrupt):
            ServeStack._wait_started(None, [never_starts], interrupted)


def test_an_interrupt_during_start_waits_for_the_deferred_block_to_end():
    """No KeyboardInterrupt between a worker's fork and the line that records its pid."""
    with signals_interrupt() as interrupted:
        with pytest.raises(KeyboardInterrupt):
            with interrupted.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100_000):  # the handler runs at a bytecode boundary in here
                    pass
                assert interrupted.is_set()
                reached_the_end = True
        assert reached_the_end


def test_options_roles_and_validation(tmp_path):
    engine = EngineSettings(model=tmp_path)
    router = RouterConfig(model_name=MODEL)
    options = ServeOptions(engine=engine, router=router, log_dir=tmp_path, prefill=2, decode=1)
    assert options.roles() == [WorkerRole.PREFILL, WorkerRole.PREFILL, WorkerRole.DECODE]
    aggregated = dataclasses.replace(options, prefill=0, decode=2)
    assert aggregated.roles() == [WorkerRole.AGGREGATED] * 2
    with pytest.raises(ValueError, match="decode"):
        dataclasses.replace(options, decode=0)
    with pytest.raises(ValueError, match="kv_transfer_config"):
        dataclasses.replace(options, engine=dataclasses.replace(engine, kv_transfer_config={}))


# --- the command line ---------------------------------------------------------------------


def test_serve_queue_flags_set_the_routers_admission_queue(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "--queue-size", "8", "--queue-timeout-s", "2.5"])
    config = RouterConfig(model_name=MODEL, **router_fields(args))
    assert (config.queue_size, config.queue_timeout_s) == (8, 2.5)
    defaults = RouterConfig(model_name=MODEL, **router_fields(parser.parse_args(["serve"])))
    assert (defaults.queue_size, defaults.queue_timeout_s) == (256, 30.0)
    assert (
        RouterConfig(model_name=MODEL, **router_fields(parser.parse_args(["serve", "--queue-size", "0"]))).queue_size
        == 0
    )
    for flag, value in (
        ("--queue-size", "-1"),
        ("--queue-size", "many"),
        ("--queue-timeout-s", "0"),
        ("--queue-timeout-s", "inf"),
        ("--queue-timeout-s", "soon"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", flag, value])
        assert f"argument {flag}: expected" in capsys.readouterr().err, (flag, value)


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (inherited by every child)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def no_process_left(marker: str) -> list[str]:
    """Waits until no process with ``marker`` is alive; returns those still alive (pid, parent,
    group, command line). Processes killed with SIGKILL as serve stops may take a moment to
    exit (a large address space takes time to tear down)."""
    deadline = time.monotonic() + 90  # a liveness bound: parent_watch's grace is 30 s
    while time.monotonic() < deadline:
        if not processes_with(marker):
            return []
        time.sleep(POLL_S / 10)
    left = []
    for pid in processes_with(marker):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200].decode(errors="replace")
            left.append(f"pid {pid} state {stat[0]} ppid {stat[1]} pgid {stat[2]}: {command}")
        except OSError:
            continue
    return left


def serve_command(tmp_path: Path, *flags: str) -> tuple[list[str], dict, str]:
    """(argv, env, marker) of ``kvbm serve`` with its logs under ``tmp_path``."""
    marker = f"kvbm-test-{uuid.uuid4()}"
    argv = [sys.executable, "-m", "kvbm.serving", "serve", "--log-dir", str(tmp_path / "logs"), "--port", "0", *flags]
    return argv, {**os.environ, "PYTHONUNBUFFERED": "1", "KVBM_TEST_MARKER": marker}, marker


def read_until(process: subprocess.Popen, prefix: str) -> list[str]:
    """stdout lines up to and including the first that starts with ``prefix``."""
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"serve exited ({process.wait()}) before {prefix!r}:\n" + "\n".join(lines))


def test_serve_names_a_worker_that_cannot_start_and_leaves_no_process(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    argv, env, marker = serve_command(tmp_path, "--model", str(broken), "--prefill", "0")
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: worker w1 (aggregated) on port" in result.stderr
    assert str(tmp_path / "logs" / "w1-aggregated.log") in result.stderr  # and its tail follows
    assert not (left := no_process_left(marker)), left


def test_serve_interrupted_while_starting_leaves_no_process(tmp_path):
    argv, env, marker = serve_command(tmp_path)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    read_until(process, "starting 1 prefill + 1 decode workers")
    for _ in range(POLLS):  # serve itself and both workers' API servers
        if len(processes_with(marker)) >= 3:
            break
        time.sleep(POLL_S / 10)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.splitlines()[-1] == "stopped", out
    assert not (left := no_process_left(marker)), left


def test_serve_answers_until_sigterm_then_leaves_no_process(tmp_path):
    argv, env, marker = serve_command(tmp_path, "--prefill", "0", "--dtype", "float32")
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = read_until(process, "ready")
        router = next(line.split()[1] for line in lines if line.startswith("router http://"))
        assert any(" w1 aggregated " in line for line in lines), lines
        assert text_of(post(router, "/v1/completions", completion_body(LONG_PROMPTS[0])))
        worker = stats_of(router)["workers"][0]
        assert worker["state"] == "active" and "tiers" in worker["block_stats"]
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.splitlines()[-1] == "stopped", out
    assert not (left := no_process_left(marker)), left


# --- one shared stack ---------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    stack: ServeStack
    reference: VLLMServer

    @property
    def url(self) -> str:
        return self.stack.url

    def workers(self, role: str) -> list[dict]:
        """The active workers in ``role``, as the admin API lists them."""
        return [
            w for w in httpx.get(self.url + "/admin/workers").json() if w["role"] == role and w["state"] == "active"
        ]

    def expected(self, path: str, body: dict) -> str:
        return text_of(post(self.reference.url, path, body))


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A 1 prefill + 1 decode stack and a plain aggregated vLLM server, started together."""
    logs = tmp_path_factory.mktemp("serve")
    template = logs / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    engine = EngineSettings(model=tiny_model, dtype="float32", max_model_len=1024, chat_template=template)
    reference = VLLMServer(engine, logs / "reference.log", served_name=MODEL, name="reference server")
    stack = ServeStack(ServeOptions(engine=engine, router=RouterConfig(model_name=MODEL), log_dir=logs))
    try:
        reference.spawn()
        stack.start()
        while not reference.poll_start():
            time.sleep(POLL_S)
        yield Served(stack, reference)
    finally:
        stack.stop()
        reference.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_disaggregated_output_equals_a_single_server(served, stream):
    bodies = [("/v1/completions", completion_body(prompt, stream)) for prompt in LONG_PROMPTS]
    bodies += [
        ("/v1/completions", completion_body("The quick brown fox", stream)),
        ("/v1/chat/completions", chat_body(stream)),
    ]
    before = prefill_hops(served.url)
    for path, body in bodies:
        expected = served.expected(path, body)
        assert expected
        assert text_of(post(served.url, path, body)) == expected, body
    assert prefill_hops(served.url) - before == len(bodies)


def test_a_router_of_its_own_serves_the_running_workers_and_its_stop_stops_none(served):
    """``kvbm router`` over the stack's workers: disaggregated, token-equal, and SIGTERM ends
    the router alone (the workers go on serving)."""
    workers = [
        f"--worker={w['role']}={w['url']}" + (f",{w['stats_url']}" if w["stats_url"] else "")
        for w in httpx.get(served.url + "/admin/workers").json()
    ]
    assert len(workers) == 2
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbm.serving", "router", "--model-name", MODEL, "--port", "0", *workers],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = read_until(process, "ready")
        router = next(line.split()[1] for line in lines if line.startswith("router http://"))
        for body in (completion_body(LONG_PROMPTS[1], True), chat_body(False)):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            assert text_of(post(router, path, body)) == served.expected(path, body)
        assert stats_of(router)["disaggregated"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.splitlines()[-1] == "stopped", out
    body = completion_body(LONG_PROMPTS[0])
    assert text_of(post(served.url, "/v1/completions", body)) == served.expected("/v1/completions", body)


def test_router_command_names_a_bad_worker_flag():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvbm.serving",
            "router",
            "--model-name",
            MODEL,
            "--worker",
            "middle=http://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "ROLE one of prefill, decode, aggregated, got 'middle=" in done.stderr


def stats_of(url: str) -> dict:
    return httpx.get(url + "/stats", timeout=30).json()


def errors(snapshot: dict) -> int:
    return sum(snapshot["errors"].values())


def prefill_hops(url: str) -> int:
    return sum(hops.get("prefill", 0) for hops in stats_of(url)["routing"].values())


def test_every_thread_of_a_worker_runs_on_the_workers_own_cores(served):
    """Not only vLLM's OpenMP threads: each worker's API server and engine core busy-wait
    between steps, and on the other worker's cores they would take its forward passes' time."""
    prefill, decode = served.stack.launcher.launched()[:2]
    groups = [parse_cpus(worker.server.cpus) for worker in (prefill, decode)]
    if len(os.sched_getaffinity(0)) >= 2:
        assert not groups[0] & groups[1]
    for worker, cpus in zip((prefill, decode), groups):
        root = psutil.Process(worker.server.pid)
        processes = [root, *root.children(recursive=True)]
        assert len(processes) >= 3, processes  # API server, engine core, model worker
        for process in processes:
            try:
                threads = process.threads()
            except psutil.NoSuchProcess:
                continue  # a short-lived child that ended meanwhile
            for thread in threads:
                try:
                    affinity = os.sched_getaffinity(thread.id)
                except ProcessLookupError:
                    continue  # the thread ended meanwhile
                assert affinity <= cpus, (worker.server.name, process.name(), thread.id, affinity)


def test_kv_crosses_over_nixl_and_stats_show_every_worker(served):
    before = stats_of(served.url)
    for prompt in LONG_PROMPTS:
        text_of(post(served.url, "/v1/completions", completion_body(prompt + " Once more:")))
    snapshot = stats_of(served.url)
    assert snapshot["disaggregated"] - before["disaggregated"] == len(LONG_PROMPTS)
    assert errors(snapshot) == errors(before)
    workers = {w["role"]: w for w in snapshot["workers"] if w["state"] == "active"}
    assert set(workers) == {"prefill", "decode"}
    for worker in workers.values():
        assert "g2" in worker["block_stats"]["tiers"], worker
    assert workers["decode"]["block_stats"]["remote"]["pulls"]["blocks_pulled"] > 0
    metrics = httpx.get(served.url + "/metrics").text
    for worker in workers.values():
        assert f'kvbm_router_worker_stats_up{{worker="{worker["id"]}"}} 1' in metrics
        assert f'kvbm_used_blocks{{worker="{worker["id"]}",tier="g2"}}' in metrics


async def send_while(url: str, bodies: list[dict], action, concurrency: int = 3):
    """Sends ``bodies`` (at most ``concurrency`` at a time); runs ``action(client)`` once the
    first reply is in. Returns (action's result, the replies in order)."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> httpx.Response:
            async with gate:
                return await client.post("/v1/completions", json=body)

        tasks = [asyncio.create_task(one(body)) for body in bodies]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        result = await action(client)
        return result, await asyncio.gather(*tasks)


def test_admin_launched_decode_worker_joins_and_draining_one_loses_nothing(served):
    launched = httpx.post(served.url + "/admin/workers", json={"role": "decode"}, timeout=30)
    assert launched.status_code == 202, launched.text
    new = launched.json()
    assert new["state"] == "starting" and new["launched"]
    for _ in range(POLLS):
        if any(w["id"] == new["id"] for w in served.workers("decode")):
            break
        time.sleep(POLL_S)
    old = next(w for w in served.workers("decode") if w["id"] != new["id"])
    before = stats_of(served.url)
    bodies = [completion_body(LONG_PROMPTS[i % 2], stream=i % 3 == 0) for i in range(12)]
    expected = [served.expected("/v1/completions", body) for body in bodies[:2]]

    async def drain(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"/admin/workers/{old['id']}/drain")

    drained, replies = asyncio.run(send_while(served.url, bodies, drain))
    assert drained.status_code == 200 and drained.json()["state"] == "stopped", drained.text
    assert [text_of(reply) for reply in replies] == [expected[i % 2] for i in range(12)]
    snapshot = stats_of(served.url)
    assert snapshot["routing"][new["id"]]["decode"] > 0
    assert errors(snapshot) == errors(before)
    with pytest.raises(httpx.ConnectError):
        httpx.get(old["url"] + "/health")


def outcome(reply: httpx.Response) -> str:
    """The generated text, or ``error: <message>`` for a request that failed cleanly."""
    if reply.status_code != 200:
        return "error: " + reply.json()["error"]["message"]
    if reply.headers["content-type"].startswith("text/event-stream"):
        for data in data_of(reply.content):
            if data.startswith("{") and '"error"' in data:
                return "error: " + json.loads(data)["error"]["message"]
    return text_of(reply)


def test_prefill_worker_killed_mid_stream_requests_complete_or_fail_cleanly(served):
    prefill = next(w for w in served.stack.router.pool.all() if w.role is WorkerRole.PREFILL)
    bodies = [completion_body(LONG_PROMPTS[1], stream=i % 2 == 1) for i in range(9)]
    expected = served.expected("/v1/completions", bodies[0])

    async def kill(client: httpx.AsyncClient) -> None:
        os.killpg(prefill.process.server.pid, signal.SIGKILL)

    _, replies = asyncio.run(send_while(served.url, bodies, kill))
    outcomes = [outcome(reply) for reply in replies]
    assert all(o == expected or (o.startswith("error: ") and len(o) > len("error: ")) for o in outcomes), outcomes
    # The router has taken the dead worker out: requests run aggregated on decode.
    for stream in (False, True):
        assert text_of(post(served.url, "/v1/completions", completion_body(LONG_PROMPTS[1], stream))) == expected
    snapshot = stats_of(served.url)
    dead = next(w for w in snapshot["workers"] if w["id"] == prefill.id)
    # Its stats endpoint fails, or (once the probe saw its process end) it is no longer asked.
    assert not dead["healthy"] and (dead["block_stats"] is None or "error" in dead["block_stats"])
    assert sum(hops.get("aggregated", 0) for hops in snapshot["routing"].values()) >= 2
