"""free_port hands out ports the kernel does not give away by itself, never the same twice."""

import socket

from kvbm.serving import server_process
from kvbm.serving.server_process import PORT_FLOOR, ephemeral_ports, free_port


def test_ports_lie_below_the_ephemeral_range_and_are_never_repeated():
    low, _ = ephemeral_ports()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(PORT_FLOOR <= port < low for port in ports)
    with socket.socket() as sock:  # free when handed out
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_bound_port_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        port = taken.getsockname()[1]
        monkeypatch.setattr(server_process, "_handed_out", set())  # only the bind tells now
        monkeypatch.setattr(server_process.random, "randrange", lambda span: port - PORT_FLOOR)
        assert free_port() not in (port, None)


def test_without_room_below_the_ephemeral_range_the_kernel_chooses(monkeypatch, tmp_path):
    narrow = tmp_path / "range"
    narrow.write_text(f"{PORT_FLOOR + 10}\t60999\n")
    monkeypatch.setattr(server_process, "EPHEMERAL_RANGE_FILE", str(narrow))
    assert ephemeral_ports() == (PORT_FLOOR + 10, 60999)
    assert free_port() >= 1024
