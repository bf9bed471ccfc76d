"""The disaggregated serve command: N prefill + M decode vLLM servers behind kvbm's router.

Contract:
    * Every worker is a ``vllm.entrypoints.openai.api_server`` on 127.0.0.1 with its own HTTP
      port, kvbm's connector (:func:`connector_config`: its NIXL worker id is its router id,
      and its scheduler serves block-pool stats on a port of its own) and its own log file.
    * :meth:`ServeStack.start` binds the router's port first (a taken port fails before any
      worker starts), spawns all workers at once, waits until every one answers ``/health``,
      then serves the router. A worker that does not come up raises
      :class:`~kvbm.serving.server_process.ServerStartError` naming it, with its log's tail.
    * Whatever happens, :meth:`ServeStack.stop` leaves no process behind: the router stops
      first (in-flight requests finish), then every worker ever launched, at once, including
      those the admin API launched later (the router holds :class:`WorkerLauncher` for that).
    * ``prefill=0`` is aggregated serving: the workers take whole requests.
    * Prefill choice is KV-aware: a :class:`~kvbm.serving.kv_index.KvIndex` follows what each
      prefill worker publishes (refreshed from a thread every ``REFRESH_INTERVAL_S``) and
      hashes prompts as the workers do.
    * :func:`serve_until_signal` runs a stack until SIGINT or SIGTERM (the CLI's ``serve``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx

from kvbm.serving.kv_index import REFRESH_INTERVAL_S, KvIndex
from kvbm.serving.router import Router, RouterServer
from kvbm.serving.router_config import RouterConfig
from kvbm.serving.server_process import ServerStartError, VLLMServer, free_port
from kvbm.serving.vllm_settings import EngineSettings
from kvbm.serving.workers import Worker, WorkerRole

WORKER_HOST = "127.0.0.1"  # workers only talk to the router and to each other
START_POLL_S = 0.5
DEFAULT_G3_CAPACITY = "2GiB"  # per worker, when serve is given a G3 directory and no size


# Set by serve for each worker; a user's kvbm settings may not name them.
SERVE_OWNED_FIELDS = ("remote", "stats_port", "stats_host", "g3_dir")


def connector_config(
    worker_id: str, stats_port: int, side_channel_port: int, kvbm: Mapping[str, Any] | None = None
) -> dict:
    """vLLM's ``kv_transfer_config`` for one worker: kvbm's connector in both roles (a worker
    prefills for a peer or decodes from one, per request), named ``worker_id`` on NIXL. The
    side channel's port is fixed up front so the worker's first request can be handed off.
    ``kvbm`` adds the user's ``kv_connector_extra_config`` fields (G2 size, G3, policies)."""
    extra = {
        **(kvbm or {}),
        "remote": {"worker": worker_id, "side_channel_port": side_channel_port},
        "stats_port": stats_port,
    }
    return {"kv_connector": "KVBMConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


def worker_kvbm(options: "ServeOptions", worker_id: str) -> dict[str, Any]:
    """The kvbm fields of one worker: the user's, plus its own G3 directory under
    ``options.g3_dir`` (a G3 directory serves one process; the id keeps it across restarts)."""
    fields = dict(options.kvbm)
    if options.g3_dir is not None:
        fields["g3_dir"] = str(Path(options.g3_dir).resolve() / worker_id)
        fields.setdefault("g3_capacity_bytes", DEFAULT_G3_CAPACITY)
    return fields


class WorkerServer:
    """One launched worker: its vLLM server and the port of its block-pool stats endpoint
    (a :class:`~kvbm.serving.workers.WorkerProcess`)."""

    def __init__(self, server: VLLMServer, stats_port: int) -> None:
        self.server = server
        self.stats_port = stats_port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def stats_url(self) -> str:
        return f"http://{WORKER_HOST}:{self.stats_port}"

    def poll_start(self) -> bool:
        return self.server.poll_start()

    def exit_code(self) -> int | None:
        return self.server.exit_code()

    def stop(self) -> None:
        self.server.stop()


def cpu_groups(workers: int, cpus: list[int] | None = None) -> list[str]:
    """Split this process's CPUs into ``workers`` disjoint groups (``"0-3"``-style lists).

    vLLM's CPU backend binds its OpenMP threads to every CPU by default, and OpenMP threads
    spin while they wait: two workers bound to the same cores slow each other down many times
    over. Each worker gets its own cores instead, for all of its processes (see
    :class:`~kvbm.serving.server_process.VLLMServer`'s ``cpus``; with more workers than CPUs,
    groups repeat). A GPU worker's host threads are bound the same way; vLLM reads the
    OpenMP binding only on its CPU backend.
    """
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    per = max(1, len(cpus) // max(1, workers))
    groups = [cpus[i : i + per] for i in range(0, len(cpus) - per + 1, per)][: max(1, workers)]
    return [",".join(map(str, group)) for group in groups]


class WorkerLauncher:
    """Spawns workers (the router's :data:`~kvbm.serving.workers.Launcher`) and remembers
    every one, so :meth:`stop_all` leaves none running.

    Args:
        engine: settings every worker shares; the connector's are added per worker.
        served_name: the model name the workers serve (the router's ``model_name``).
        log_dir: each worker logs to ``<id>-<role>.log`` here.
        start_timeout_s: how long a worker may take to answer ``/health``.
        cpus: CPU groups (:func:`cpu_groups`) handed to workers in turn.
        kvbm: a worker id's kvbm fields (see :func:`connector_config`).
    """

    def __init__(
        self,
        engine: EngineSettings,
        served_name: str,
        log_dir: Path,
        start_timeout_s: float,
        cpus: list[str],
        kvbm: Callable[[str], Mapping[str, Any]] = lambda worker_id: {},
    ) -> None:
        self._engine = engine
        self._kvbm = kvbm
        self._served_name = served_name
        self._log_dir = Path(log_dir)
        self._start_timeout_s = start_timeout_s
        self._cpus = cpus
        self._launched: list[WorkerServer] = []

    def __call__(self, role: WorkerRole, worker_id: str) -> WorkerServer:
        stats_port = free_port(WORKER_HOST)
        connector = connector_config(worker_id, stats_port, free_port(WORKER_HOST), self._kvbm(worker_id))
        settings = dataclasses.replace(self._engine, kv_transfer_config=connector)
        cpus = self._cpus[len(self._launched) % len(self._cpus)]
        server = VLLMServer(
            settings,
            self.log_path(role, worker_id),
            host=WORKER_HOST,
            served_name=self._served_name,
            name=f"worker {worker_id} ({role.value})",
            cpus=cpus,
        )
        worker = WorkerServer(server, stats_port)
        self._launched.append(worker)
        server.spawn(self._start_timeout_s)
        return worker

    def launched(self) -> list[WorkerServer]:
        """Every worker launched so far, in launch order (stopped ones included)."""
        return list(self._launched)

    def log_path(self, role: WorkerRole, worker_id: str) -> Path:
        return self._log_dir / f"{worker_id}-{role.value}.log"

    def stop_all(self) -> None:
        """Stops every worker launched so far, all at once (each takes seconds)."""
        launched = self.launched()
        if launched:
            with ThreadPoolExecutor(len(launched)) as pool:
                list(pool.map(WorkerServer.stop, launched))


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What one stack runs.

    Attributes:
        engine: settings every worker shares (model, dtype, lengths, chat template); serve
            sets each worker's ``kv_transfer_config``, so it must be None here.
        router: the router's settings; ``model_name`` is the name the workers serve.
        log_dir: where the workers' logs go.
        prefill: prefill workers at start; 0 serves aggregated.
        decode: decode workers at start (aggregated workers when ``prefill`` is 0).
        start_timeout_s: how long each worker may take to become healthy.
        kvbm: ``kv_connector_extra_config`` fields every worker gets (G2 size, policies...),
            checked here so a wrong one stops serve before any worker starts; serve sets
            ``remote``, ``stats_port``, ``stats_host`` and ``g3_dir`` itself.
        g3_dir: each worker keeps a G3 disk tier in ``<g3_dir>/<worker id>`` (size:
            ``kvbm["g3_capacity_bytes"]``, default 2 GiB), so a stack started again on the
            same directory comes back warm.
    """

    engine: EngineSettings
    router: RouterConfig
    log_dir: Path
    prefill: int = 1
    decode: int = 1
    start_timeout_s: float = 300.0
    kvbm: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    g3_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.engine.kv_transfer_config is not None:
            raise ValueError("engine.kv_transfer_config must be None: serve sets each worker's")
        if not isinstance(self.prefill, int) or self.prefill < 0:
            raise ValueError(f"prefill must be an integer >= 0, got {self.prefill!r}")
        if not isinstance(self.decode, int) or self.decode < 1:
            raise ValueError(f"decode must be an integer >= 1, got {self.decode!r}")
        if not isinstance(self.kvbm, Mapping):
            raise ValueError(f"kvbm must be a mapping of kv_connector_extra_config fields, got {self.kvbm!r}")
        if owned := [name for name in SERVE_OWNED_FIELDS if name in self.kvbm]:
            hint = " (give serve a G3 directory instead: each worker gets its own)" if "g3_dir" in owned else ""
            raise ValueError(f"kvbm config: serve sets {', '.join(owned)} for each worker{hint}")
        from kvbm.connectors.vllm.config import ConnectorConfig  # no vllm import

        ConnectorConfig.from_extra_config(
            connector_config("w0", 0, 0, worker_kvbm(self, "w0"))["kv_connector_extra_config"]
        )

    def roles(self) -> list[WorkerRole]:
        """The workers' roles at start, prefill first."""
        decode = WorkerRole.DECODE if self.prefill else WorkerRole.AGGREGATED
        return [WorkerRole.PREFILL] * self.prefill + [decode] * self.decode


class ServeStack:
    """The workers and the router of one serve command (see the module contract)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.launcher = WorkerLauncher(
            options.engine,
            options.router.model_name,
            options.log_dir,
            options.start_timeout_s,
            cpu_groups(len(options.roles())),
            kvbm=lambda worker_id: worker_kvbm(options, worker_id),
        )
        template = options.engine.chat_template
        self.index = KvIndex(options.engine.model, template.read_text() if template else None)
        self.router = Router(
            options.router,
            prompt_hashes=self.index.prompt_hashes,
            published=self.index.published,
            launcher=self.launcher,
        )
        self._server: RouterServer | None = None
        self._stop_index = threading.Event()
        self._index_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the stack is not started"
        return self._server.url

    def start(self, interrupted: Interrupted | None = None) -> "ServeStack":
        """Starts the workers, waits for them, then serves the router in a background thread.

        Args:
            interrupted: set by a signal handler (see :func:`signals_interrupt`); start runs
                with its KeyboardInterrupt deferred and checks it while waiting for workers.

        Raises:
            ServerStartError: a worker did not come up (everything is stopped first).
            OSError: the router's address cannot be bound.
            KeyboardInterrupt: ``interrupted`` was set (everything is stopped first).
        """
        interrupted = interrupted or Interrupted()
        try:
            with interrupted.deferred():
                self._server = RouterServer(self.router)
                workers = [self.router.launch_worker(role) for role in self.options.roles()]
                self._wait_started(workers, interrupted)
                self._index_thread = threading.Thread(target=self._follow_index, name="kvbm-kv-index", daemon=True)
                self._index_thread.start()
                self._server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_started(self, workers: list[Worker], interrupted: threading.Event) -> None:
        pending = list(workers)
        while pending:
            if interrupted.is_set():
                raise KeyboardInterrupt
            for worker in list(pending):
                assert worker.process is not None
                if worker.process.poll_start():
                    self.router.pool.started(worker)
                    pending.remove(worker)
            if pending:
                interrupted.wait(START_POLL_S)

    def stop(self) -> None:
        """Stops the router (in-flight requests finish), then every worker; idempotent."""
        server, self._server = self._server, None
        self._stop_index.set()
        try:
            if server is not None:
                server.stop()
        finally:
            self.launcher.stop_all()
            if self._index_thread is not None:
                self._index_thread.join()

    def _follow_index(self) -> None:
        """Keeps the KV index current with the prefill workers in the pool."""
        with httpx.Client() as client:
            while not self._stop_index.wait(REFRESH_INTERVAL_S):
                workers = {
                    w.id: w.stats_url for w in self.router.pool.all() if w.role is WorkerRole.PREFILL and w.stats_url
                }
                self.index.refresh(client, workers)

    def __enter__(self) -> "ServeStack":
        return self if self._server is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Interrupted(threading.Event):
    """Set by SIGINT/SIGTERM under :func:`signals_interrupt`, which also raises
    KeyboardInterrupt, except inside :meth:`deferred` (there only the Event is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.raising = True

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """No KeyboardInterrupt in this block: code in it checks the Event instead. A
        KeyboardInterrupt between a worker's fork and the line recording its pid would leave
        that worker unknown to ``stop`` (CI once found such a server alive after serve stopped)."""
        raising, self.raising = self.raising, False
        try:
            yield
        finally:
            self.raising = raising
        if self.is_set():
            raise KeyboardInterrupt


@contextmanager
def signals_interrupt() -> Iterator[Interrupted]:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; later ones are ignored, so a second
    Ctrl-C cannot cut the shut-down short and leave workers behind.

    Yields the :class:`Interrupted` Event the handler sets first. Python drops an exception
    raised while it runs a finalizer or weakref callback ("Exception ignored in ..."), and a
    signal handler can run there: waits must check the Event, not rely on the
    KeyboardInterrupt alone (CI once saw serve ignore its SIGTERM this way and start up fully)."""
    interrupted = Interrupted()

    def interrupt(signum: int, frame: object) -> None:
        for name in (signal.SIGINT, signal.SIGTERM):
            signal.signal(name, signal.SIG_IGN)
        interrupted.set()
        if interrupted.raising:
            raise KeyboardInterrupt

    previous = {name: signal.signal(name, interrupt) for name in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupted
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)


def describe(stack: ServeStack) -> list[str]:
    """One line per worker: id, role, URL, stats URL, log."""
    return [
        f"  {w.id} {w.role.value:<10} {w.url}  stats {w.stats_url}  log {stack.launcher.log_path(w.role, w.id)}"
        for w in stack.router.pool.all()
    ]


def serve_until_signal(options: ServeOptions, out: TextIO = sys.stdout) -> int:
    """Runs a stack until SIGINT/SIGTERM (main thread only); 0 after a clean stop, 1 when a
    worker did not start or the router's address is taken."""
    print(
        f"starting {options.prefill} prefill + {options.decode} "
        f"{'decode' if options.prefill else 'aggregated'} workers (logs: {options.log_dir}) ...",
        file=out,
        flush=True,
    )
    with signals_interrupt() as interrupted:
        try:
            with ServeStack(options).start(interrupted) as stack:
                print(
                    f"router {stack.url} serving model {options.router.model_name!r}; workers:",
                    *describe(stack),
                    "ready (Ctrl-C or SIGTERM stops)",
                    sep="\n",
                    file=out,
                    flush=True,
                )
                interrupted.wait()
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            print("stopped", file=out, flush=True)
            return 0
        except (ServerStartError, OSError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
    return 0
