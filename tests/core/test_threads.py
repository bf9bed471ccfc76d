"""kvbm's threads escape the engine's core binding (see kvbm/process/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

# Mimics vLLM's CPU worker: an OpenMP thread bound to the last CPU is started first, then the
# main thread binds itself to the first CPU and starts kvbm's threads.
SCRIPT = textwrap.dedent(
    """
    import os, queue, threading
    from kvbm.process.threads import start_thread, thread_pool
    first, last = {first}, {last}
    omp_ready, stop = threading.Event(), threading.Event()
    def omp_thread():
        os.sched_setaffinity(0, {{last}})
        omp_ready.set()
        stop.wait()
    threading.Thread(target=omp_thread, daemon=True).start()
    omp_ready.wait()
    os.sched_setaffinity(0, {{first}})
    seen = queue.Queue()
    start_thread(lambda: seen.put(os.sched_getaffinity(0)), "probe").join()
    with thread_pool(1, "probe-pool") as pool:
        pooled = pool.submit(lambda: os.sched_getaffinity(0)).result()
    plain = []
    t = threading.Thread(target=lambda: plain.append(os.sched_getaffinity(0)))
    t.start(); t.join()
    print(sorted(seen.get()), sorted(pooled), sorted(plain[0]), sorted(os.sched_getaffinity(0)))
    stop.set()
    """
)


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to bind threads apart")
def test_kvbm_threads_run_on_every_cpu_of_the_process_not_the_main_threads_one():
    first, last = CPUS[0], CPUS[-1]
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(first=first, last=last)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split("] [")
    started, pooled, plain, main = (sorted(int(c) for c in part.strip("[]\n").split(",")) for part in out)
    assert plain == [first] == main  # what an ordinary thread inherits: the main thread's one CPU
    assert started == [first, last]
    assert pooled == [first, last]
