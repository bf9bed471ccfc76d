"""One benchmark setup running: its vLLM servers behind kvbm's router, and its counters.

Contract: :meth:`Stack.start` spawns every server of a :class:`Setup` at once (each with
its own ports, log, connector settings and scratch directories), waits until all answer
``/health`` and puts a :class:`~kvbm.serving.router.Router` in front of them; on any failure
it stops what it started and raises. :meth:`Stack.stop` (or leaving the ``with`` block)
stops the router, then every server, and removes the scratch directories.

Every setup is served through the router, also the one-server ones, so all rows pay the
same extra HTTP hop. The router runs in a process of its own (``kvbm router``), as under
``kvbm serve``: inside the benchmark's process it would share one GIL with the load generator.
A disaggregated setup has one prefill and one decode worker: the
router sends each request to the prefill worker (``max_tokens=1``,
``kv_transfer_params={"do_remote_decode": true}``) and then to the decode worker with the
``kv_transfer_params`` the prefill returned, which kvbm and vLLM's NixlConnector both use.

On vLLM's CPU backend each server's OpenMP threads are bound to cores of their own, as the
serve command does (:func:`~kvbm.serving.serve.cpu_groups`: spinning OpenMP threads of two
servers on the same cores slow both down many times over); a disaggregated setup therefore
splits the machine's cores between its prefill and decode servers, and a one-server setup
has them all.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from bench import scrape
from kvbm.serving.serve import cpu_groups
from kvbm.serving.server_process import VLLMServer, free_port
from kvbm.serving.vllm_settings import EngineSettings
from kvbm.serving.workers import WorkerRole

START_TIMEOUT_S = 900.0  # a busy 2-core machine has taken 4 minutes to start two servers
REQUEST_TIMEOUT_S = 600.0  # one request; a hung transfer fails the setup, not the suite
# The router's health probe would take a worker slow to answer /health under load out of
# the rotation, and requests would silently run aggregated: probe once a run at most.
HEALTH_INTERVAL_S = 3600.0
POLL_S = 0.5


def exit_on_sigterm() -> None:
    """Turns SIGTERM into SystemExit, so a terminated benchmark still stops its servers
    (they run in sessions of their own and would outlive it)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Connector(enum.Enum):
    NONE = "none"
    KVBM = "KVBMConnector"
    NIXL = "NixlConnector"
    EXAMPLE = "ExampleConnector"
    LMCACHE = "LMCacheConnectorV1"


@dataclasses.dataclass(frozen=True)
class Setup:
    """What runs: one aggregated server, or one prefill and one decode server.

    Attributes:
        name: the row label.
        connector: the KV connector every server runs.
        disaggregated: one prefill + one decode worker; otherwise one aggregated worker.
        extra_config: ``kv_connector_extra_config`` entries shared by the servers (kvbm's
            tier sizes...); per-server entries (ports, NIXL names, directories) are added here.
        g3_capacity: kvbm only: a G3 tier of this size in a fresh scratch directory.
        env: environment shared by the servers (LMCache reads its settings from there).
    """

    name: str
    connector: Connector
    disaggregated: bool = False
    extra_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    g3_capacity: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SharedDeviceSettings(EngineSettings):
    """Engine settings plus the share of a GPU a server may take, for two servers on one
    GPU (vLLM's default takes 90% of it); None: vLLM's default."""

    gpu_memory_utilization: float | None = None

    def server_command(self, host: str, port: int, served_name: str | None = None) -> list[str]:
        argv = super().server_command(host, port, served_name)
        if self.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return argv


@dataclasses.dataclass
class StackWorker:
    """One server of a stack."""

    role: WorkerRole
    server: VLLMServer
    stats_url: str | None  # kvbm's block-pool stats endpoint


class RouterProcess:
    """``python -m kvbm.serving router`` over a stack's workers, in a session of its own. It
    binds a port the OS picks (a port chosen here could be taken before it binds: servers
    still starting bind theirs late) and names its URL in its log."""

    def __init__(self, served_name: str, workers: list[StackWorker], log: Path) -> None:
        self.url = ""
        self._command = [
            sys.executable,
            "-m",
            "kvbm.serving",
            "router",
            "--model-name",
            served_name,
            "--port",
            "0",
            "--request-timeout-s",
            str(REQUEST_TIMEOUT_S),
            "--health-interval-s",
            str(HEALTH_INTERVAL_S),
        ]
        for worker in workers:
            self._command += [
                "--worker",
                f"{worker.role.value}={worker.server.url}" + (f",{worker.stats_url}" if worker.stats_url else ""),
            ]
        self._log = log
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        """Spawns the router and waits until it says it is ready.

        Raises:
            RuntimeError: it exited or was not ready within START_TIMEOUT_S.
        """
        with open(self._log, "ab") as log:
            start = log.tell()
            self._process = subprocess.Popen(
                self._command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with open(self._log, "rb") as log:
                log.seek(start)
                text = log.read().decode(errors="replace")
            if found := re.search(r"^router (http://\S+) serving", text, re.MULTILINE):
                if "\nready" in text[found.end() :]:
                    self.url = found.group(1)
                    return
            if self._process.poll() is not None:
                raise RuntimeError(f"the router exited with {self._process.returncode} (log: {self._log})")
            time.sleep(POLL_S)
        raise RuntimeError(f"the router was not ready within {START_TIMEOUT_S:.0f} s (log: {self._log})")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


class Stack:
    """The servers and router of one :class:`Setup` (see the module contract).

    Args:
        setup: what to run.
        engine: settings every server shares (the connector's are added per server).
        served_name: the model name clients send.
        log_dir: one log per server, ``<setup>-<role>.log``.
        scratch_dir: parent of the setup's G3 and shared-storage directories (on disk).
        cuda_devices: visible CUDA devices; 0 on the CPU backend.
    """

    def __init__(
        self,
        setup: Setup,
        engine: EngineSettings,
        served_name: str,
        log_dir: Path,
        scratch_dir: Path,
        cuda_devices: int,
    ) -> None:
        self.setup = setup
        self._engine = engine
        self._served_name = served_name
        self._log_dir = Path(log_dir)
        self._scratch = Path(tempfile.mkdtemp(prefix="kvbm-bench-", dir=scratch_dir))
        self._cuda_devices = cuda_devices
        self.workers: list[StackWorker] = []
        self._router: RouterProcess | None = None

    @property
    def url(self) -> str:
        assert self._router is not None, "not started"
        return self._router.url

    def start(self) -> "Stack":
        roles = [WorkerRole.PREFILL, WorkerRole.DECODE] if self.setup.disaggregated else [WorkerRole.AGGREGATED]
        try:
            for index, role in enumerate(roles):
                self.workers.append(self._spawn(index, role, len(roles)))
            pending = [w.server for w in self.workers]
            while pending:
                pending = [s for s in pending if not s.poll_start()]
                time.sleep(POLL_S if pending else 0)
            self._router = RouterProcess(self._served_name, self.workers, self._log_dir / f"{self._slug()}-router.log")
            self._router.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, index: int, role: WorkerRole, count: int) -> StackWorker:
        worker_id = f"{self._slug()}-{role.value}"
        kv_config, env, stats_url = self._connector(worker_id, role)
        env = {**self.setup.env, **env}
        utilization = cpus = None
        if self._cuda_devices:
            env["CUDA_VISIBLE_DEVICES"] = str(index % self._cuda_devices)
            sharing = -(-count // self._cuda_devices)
            utilization = round(0.9 / sharing, 2) if sharing > 1 else None
        else:
            groups = cpu_groups(count)
            cpus = groups[index % len(groups)]
        shared = {f.name: getattr(self._engine, f.name) for f in dataclasses.fields(EngineSettings)}
        settings = SharedDeviceSettings(
            **{**shared, "kv_transfer_config": kv_config}, gpu_memory_utilization=utilization
        )
        server = VLLMServer(
            settings,
            self._log_dir / f"{worker_id}.log",
            served_name=self._served_name,
            extra_env=env,
            name=f"{self.setup.name} {role.value} server",
            cpus=cpus,
        )
        server.spawn(START_TIMEOUT_S)
        return StackWorker(role, server, stats_url)

    def _connector(self, worker_id: str, role: WorkerRole) -> tuple[dict | None, dict[str, str], str | None]:
        """(kv_transfer_config, extra environment, kvbm stats URL) of one server."""
        setup = self.setup
        extra = dict(setup.extra_config)
        if setup.connector is Connector.NONE:
            return None, {}, None
        config: dict[str, Any] = {"kv_connector": setup.connector.value, "kv_role": "kv_both"}
        env: dict[str, str] = {}
        stats_url = None
        if setup.connector is Connector.KVBM:
            stats_port = free_port()
            extra["stats_port"] = stats_port
            stats_url = f"http://127.0.0.1:{stats_port}"
            if setup.disaggregated:
                # A prefill's handoff names its side channel: it must be known before its first step.
                extra["remote"] = {"worker": worker_id, "side_channel_port": free_port()}
            if setup.g3_capacity is not None:
                extra["g3_dir"] = str(self._scratch / f"g3-{role.value}")
                extra["g3_capacity_bytes"] = setup.g3_capacity
        elif setup.connector is Connector.NIXL:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
            config["kv_buffer_device"] = "cuda" if self._cuda_devices else "cpu"
            if not self._cuda_devices:
                # One UCX worker: with vLLM's default of 4, reads on this backend stalled until
                # the prefill's 30 s lease ran out (see bench/README.md).
                extra["num_threads"] = 0
        elif setup.connector is Connector.EXAMPLE:
            extra["shared_storage_path"] = str(self._scratch / f"example-{role.value}")
        if extra:
            config["kv_connector_extra_config"] = extra
        return config, env, stats_url

    def _slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.setup.name.lower()).strip("-")

    def warm_up(self, vocab: int, block_size: int) -> None:
        """Two short requests through the router (first steps, NIXL handshakes), not measured."""
        for seed in (1, 2):
            prompt = [3 + (seed * 7919 + i * 104729) % (vocab - 3) for i in range(2 * block_size + 5)]
            reply = httpx.post(
                self.url + "/v1/completions",
                timeout=REQUEST_TIMEOUT_S,
                json={"model": self._served_name, "prompt": prompt, "max_tokens": 4, "temperature": 0},
            )
            reply.raise_for_status()

    def counters(self) -> dict[str, dict[str, float]]:
        """Every worker's vLLM counters and kvbm stats, keyed by role, plus the router's."""
        out: dict[str, dict[str, float]] = {}
        for worker in self.workers:
            values = scrape.vllm_counters(worker.server.url)
            if worker.stats_url is not None:
                values.update({f"kvbm.{k}": v for k, v in scrape.kvbm_stats(worker.stats_url).items()})
            out[worker.role.value] = values
        router = httpx.get(self.url + "/stats", timeout=30).json()
        out["router"] = {
            "disaggregated": router["disaggregated"],
            "prefill_failures": router["prefill_failures"],
            "transfer_failures": router["transfer_failures"],
            "retries": router["retries"],
        }
        return out

    def stop(self) -> None:
        if self._router is not None:
            self._router.stop()
            self._router = None
        for worker in self.workers:
            worker.server.stop()
        self.workers = []
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
