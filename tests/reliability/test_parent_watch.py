"""A server started by kvbm exits when its starter dies by SIGKILL (kvbm.process.parent_watch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from kvbm.process import parent_watch

# The starter spawns a "server" (a session of its own, as VLLMServer does) that runs the watch,
# plus a child of the server, and prints their pids; the server ignores SIGTERM so the test
# also sees the SIGKILL of its process group after the grace period.
STARTER = textwrap.dedent(
    """
    import os, subprocess, sys
    code = '''
    import os, signal, subprocess, sys, time
    from kvbm.process import parent_watch
    parent_watch.GRACE_S = 0.5
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    assert parent_watch.watch() and not parent_watch.watch()
    print(os.getpid(), child.pid, flush=True)
    time.sleep(600)
    '''
    from kvbm.process import parent_watch
    env = {**os.environ, "KVBM_EXIT_WITH_PID": parent_watch.starter_value()}
    server = subprocess.Popen([sys.executable, "-c", code.replace("\\n    ", "\\n")], env=env,
                              start_new_session=True, stdout=subprocess.PIPE, text=True)
    print(server.stdout.readline().strip(), flush=True)
    server.wait()
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_server_and_its_children_exit_after_their_starter_is_killed():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    server, child = map(int, starter.stdout.readline().split())
    assert alive(server) and alive(child)
    starter.kill()
    starter.wait()
    for _ in range(600):  # a liveness bound, not a speed check
        if not alive(server) and not alive(child):
            break
        time.sleep(0.1)
    assert not alive(server) and not alive(child)


def test_watch_runs_only_in_the_process_the_environment_names():
    assert not parent_watch.watch({})
    assert not parent_watch.watch({parent_watch.ENV: "not-a-pid"})
    assert not parent_watch.watch({parent_watch.ENV: str(os.getpid())})  # we are not our own child
    assert not parent_watch.watch({parent_watch.ENV: parent_watch.starter_value()})


def test_a_server_whose_starter_died_before_its_watch_began_exits():
    """serve stopped while a server was still importing vLLM: the server is an orphan from the
    start (CI once found one alive, parent pid 1, long after serve had stopped)."""
    starter = subprocess.run(
        [sys.executable, "-c", "from kvbm.process import parent_watch; print(parent_watch.starter_value())"],
        capture_output=True,
        text=True,
        check=True,
    )
    code = (
        "import time; from kvbm.process import parent_watch; parent_watch.GRACE_S = 0.5; "
        "assert parent_watch.watch(); time.sleep(600)"
    )
    orphan = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        env={**os.environ, parent_watch.ENV: starter.stdout.strip()},
    )
    assert orphan.wait(timeout=120) == -signal.SIGTERM
