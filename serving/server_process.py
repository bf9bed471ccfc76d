"""A vLLM OpenAI server as a child process: start, wait until healthy, stop.

Contract: :meth:`VLLMServer.start` returns once ``/health`` answers 200, or raises
:class:`ServerStartError` (the process exited, or the deadline passed) after stopping the
child, with the server's name and the tail of its log in the message. Callers that start
several servers at once use :meth:`VLLMServer.spawn` and then poll each with
:meth:`VLLMServer.poll_start` (same outcome, no thread per server).
:meth:`VLLMServer.stop` always leaves no child behind: SIGTERM, then SIGKILL after a grace
period; it may be called at any time, also while a start is being polled.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from kvbm.process import parent_watch
from kvbm.serving.vllm_settings import EngineSettings, vllm_env


class ServerStartError(RuntimeError):
    """A server did not become healthy."""


# Ports handed out below the kernel's ephemeral range. The kernel gives every outgoing
# connection's source port and every bind to port 0 (vLLM's ZMQ sockets, NIXL) a port from the
# ephemeral range: a port picked there is free now and may be anyone's a second later, before
# the worker it was picked for binds it (CI saw "Address already in use" at a worker's start).
# Below it only explicit choices land, and this process never hands one out twice.
PORT_FLOOR = 10000
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = map(int, Path(EPHEMERAL_RANGE_FILE).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago, that the kernel does not hand out
    by itself and that this process has not returned before (see :data:`PORT_FLOOR`).

    Falls back to a kernel-chosen port (racy, as above) only when the range below the
    ephemeral one is too small or full.
    """
    low, _ = ephemeral_ports()
    span = low - PORT_FLOOR
    with _handed_out_lock:
        if span >= 1000:
            start = random.randrange(span)  # two processes choosing at once rarely meet
            for offset in range(span):
                port = PORT_FLOOR + (start + offset) % span
                if port not in _handed_out and _bindable(host, port):
                    _handed_out.add(port)
                    return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def parse_cpus(cpus: str) -> set[int]:
    """``"0,2-3"`` → ``{0, 2, 3}`` (the list format of taskset and VLLM_CPU_OMP_THREADS_BIND).

    Raises:
        ValueError: not such a list.
    """
    ids: set[int] = set()
    for part in cpus.split(","):
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids


@contextlib.contextmanager
def bound_children(cpus: str | None) -> Iterator[None]:
    """Processes started inside the block run on ``cpus`` (and so do their children).

    A child inherits the CPU mask of the thread that forks it, so the calling thread is
    bound for the block's length and then restored: other threads are untouched, and no code
    runs between fork and exec. Without ``cpus``, or where the OS has no affinity, a no-op.
    """
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, parse_cpus(cpus))  # 0: the calling thread, on Linux
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` process.

    Args:
        settings: engine settings.
        log_path: file that receives the server's stdout and stderr.
        host: address to bind; loopback unless the caller says otherwise.
        port: TCP port; a free one when None.
        extra_env: added to the environment (after :func:`vllm_env`).
        served_name: the model name clients send; the model path when None.
        name: how errors name this server (e.g. ``worker w2 (decode)``).
        cpus: CPUs (``"0,1"``) the server's every process runs on, its OpenMP threads
            included (``VLLM_CPU_OMP_THREADS_BIND``); all of this process's when None.
            Binding only the OpenMP threads is not enough on a few cores: each server's API
            server and engine core busy-wait between steps (vLLM's shared-memory queue
            yields for 1 s after every message), and where they roam onto another server's
            cores they take its forward pass's time. Measured on 2 cores, two one-core
            workers behind the router, 16 streams: 397 tok/s with only OpenMP bound, 1,337
            with every process bound.
    """

    def __init__(
        self,
        settings: EngineSettings,
        log_path: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        served_name: str | None = None,
        name: str = "vLLM server",
        cpus: str | None = None,
    ) -> None:
        self.settings = settings
        self.log_path = Path(log_path)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.served_name = served_name
        self.name = name
        self._extra_env = dict(extra_env or {})
        self.cpus = cpus
        if cpus is not None:
            self._extra_env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        self._process: subprocess.Popen | None = None
        self._deadline = 0.0
        self._timeout_s = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> "VLLMServer":
        """Starts the server and waits for ``/health``.

        Raises:
            ServerStartError: the process died or was not healthy within ``timeout_s``.
        """
        self.spawn(timeout_s)
        while not self.poll_start():
            time.sleep(poll_s)
        return self

    def spawn(self, timeout_s: float = 300.0) -> "VLLMServer":
        """Starts the process and returns at once; :meth:`poll_start` says when it is up."""
        env = {**os.environ, **vllm_env(), **self._extra_env, parent_watch.ENV: parent_watch.starter_value()}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A session of its own, so stop() can signal the server and any children it forks.
            with bound_children(self.cpus):
                self._process = subprocess.Popen(
                    self.settings.server_command(self.host, self.port, self.served_name),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        return self

    def poll_start(self) -> bool:
        """True once the spawned server answers ``/health``; False while it is starting.

        Raises:
            ServerStartError: the process exited, was stopped, or passed its start deadline
                (it is stopped first).
        """
        process = self._process
        if process is None:
            raise ServerStartError(f"{self.name} on port {self.port} was stopped during start-up")
        if process.poll() is not None:
            self.stop()
            raise ServerStartError(
                f"{self.name} on port {self.port} exited with {process.returncode} during "
                f"start-up; log {self.log_path}:\n{self.log_tail()}"
            )
        if self.healthy():
            return True
        if time.monotonic() > self._deadline:
            self.stop()
            raise ServerStartError(
                f"{self.name} on port {self.port} not healthy after {self._timeout_s:.0f} s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        return False

    def exit_code(self) -> int | None:
        """The server process's exit status once it has ended (reaping it), else None; None
        also before ``spawn`` and after ``stop``."""
        return None if self._process is None else self._process.poll()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace_s: float = 20.0) -> None:
        """Stops the server and everything it started; idempotent.

        SIGTERM goes to the API server alone, so it shuts its engine core down in order
        (signalling the whole group at once makes the server log the engine's death as a
        crash); whatever of the group is left after the grace period is killed.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
