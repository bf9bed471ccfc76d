"""Threads kvbm starts inside an engine's process, free of the engine's core binding.

vLLM's CPU worker binds each OpenMP thread to one core, its main thread included, and a new
thread inherits the binding of the thread that starts it. kvbm's threads, started from the
main thread, would all share its one core: block copies would queue behind the forward pass,
and where workers share cores (two workers bound to the same cores, vLLM's default) each
worker's main thread spins on core 0 between steps, so a side-channel request waited over 5 s
to be accepted and every remote pull timed out. kvbm's threads run on every CPU some thread of
their process may use instead (the set the engine was given), which is the same set the
process had before binding wherever the binding is disjoint per worker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def process_cpus() -> set[int] | None:
    """The CPUs any thread of this process may run on; None where the OS cannot tell."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return set(os.sched_getaffinity(0))
    for task in tasks:
        try:
            cpus |= os.sched_getaffinity(int(task))
        except (OSError, ValueError):
            continue  # the thread ended while we looked
    return cpus or None


def unbind_current_thread() -> None:
    """Lets the calling thread run on every CPU of its process (:func:`process_cpus`)."""
    cpus = process_cpus()
    if cpus and cpus != os.sched_getaffinity(0):
        try:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread, on Linux
        except OSError:
            pass  # a cgroup narrowed the set meanwhile; the inherited binding still works


def start_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """Starts a daemon thread running ``target`` on every CPU of this process."""

    def run() -> None:
        unbind_current_thread()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def thread_pool(workers: int, name_prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run on every CPU of this process."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name_prefix, initializer=unbind_current_thread)
