"""A worker server exits when the process that started it dies, even by SIGKILL.

The serve command stops its workers on the way out, but a serve process killed with SIGKILL
has no way out, and its workers (each in a session of its own, so that ``VLLMServer.stop``
can signal the server's whole process tree) would run on, holding ports, memory and cores.
So :meth:`~kvbm.serving.server_process.VLLMServer.spawn` names its own pid in
:data:`ENV`, and kvbm's vLLM plugin, which vLLM runs in every process it starts, calls
:func:`watch`. In every process below that pid (the API server, its engine core, the engine's
workers) a thread polls the process's parent; once it is gone the process gets SIGTERM (vLLM's
clean shutdown) and, if it still runs after :data:`GRACE_S`, its process group gets SIGKILL.
Each level needs its own watch: vLLM's engine core outlives an API server killed by SIGKILL.
A server whose starter died before the plugin ran (serve stopped while the server was still
importing vLLM) is an orphan from the start: :data:`ENV` carries the starter's start time
with its pid, so the watch can tell "my starter is gone" from "I am not below that pid".

Linux's ``PR_SET_PDEATHSIG`` is no substitute: it fires when the spawning *thread* exits,
and the router launches workers from its request threads.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping

ENV = "KVBM_EXIT_WITH_PID"
POLL_S = 0.5
GRACE_S = 30.0

_watching = False  # per process: vLLM may run its plugins more than once


def starter_value() -> str:
    """What a starter puts in :data:`ENV` for its children: its pid and start time."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def watch(environ: Mapping[str, str] = os.environ) -> bool:
    """Starts the watch in a process below the starter :data:`ENV` names, or ends this
    process when that starter is already gone; True when it started now."""
    global _watching
    pid, _, started = environ.get(ENV, "").partition(":")
    if _watching or not pid.isdigit():
        return False
    if int(pid) in _ancestors():
        parent = os.getppid()
    elif started.isdigit() and _start_time(int(pid)) != int(started):
        parent = None  # the starter died (or its pid now names another process): exit now
    else:
        return False  # the starter runs, and this process is not below it
    _watching = True
    threading.Thread(target=_exit_after, args=(parent,), name="kvbm-parent-watch", daemon=True).start()
    return True


def _ancestors() -> set[int]:
    """Pids of this process's parent, its parent's parent, ... (empty where /proc is missing)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rpartition(")")[2].split()[1])  # field 4: ppid
        except (OSError, ValueError, IndexError):
            break
    return found


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot; /proc/<pid>/stat field 22), None when
    it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _exit_after(parent: int | None) -> None:
    while parent is not None and os.getppid() == parent:  # an orphan is re-parented: its parent pid changes
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.killpg(os.getpgid(0), signal.SIGKILL)
