"""A tiny TCP side channel: one JSON request, one JSON reply, with timeouts on both ends.

Frames are a 4-byte big-endian length and UTF-8 JSON. A request is ``{"op": NAME, ...}``; the
reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE}``. The server runs each
request's handler on its own thread (handlers must be thread-safe; they never touch the NIXL
agent). The client (:func:`request`) raises :class:`~kvbm.remote.failures.RemoteError` of kind
UNREACHABLE for a refused connection, a timeout, a closed socket or an error reply, so a
caller can always tell "the peer did not answer" from a programming error.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
from collections.abc import Callable, Mapping
from typing import Any

from kvbm.process.threads import start_thread
from kvbm.remote.failures import FailureKind, RemoteError

Handler = Callable[[Mapping[str, Any]], dict[str, Any]]

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


def request(address: str, payload: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Send one request to ``address`` (``"host:port"``) and return the reply's fields.

    Raises:
        RemoteError: UNREACHABLE (refused, timed out, malformed or error reply).
        ValueError: ``address`` is not ``host:port``.
    """
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            _send(sock, payload)
            reply = _recv(sock)
    except (OSError, ValueError) as exc:
        raise RemoteError(FailureKind.UNREACHABLE, f"side channel {address} ({payload.get('op')}): {exc!r}") from None
    if reply.get("ok") is not True:
        raise RemoteError(FailureKind.UNREACHABLE, f"side channel {address} refused: {reply.get('error')}")
    return reply


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"side channel address must be host:port, got {address!r}")
    return host, int(port)


class SideChannelServer:
    """Serves ``handlers`` (op name → function of the request) on ``host:port``.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, host: str, port: int, handlers: Mapping[str, Handler], *, timeout_s: float) -> None:
        self._handlers = dict(handlers)
        self._timeout_s = timeout_s
        outer = self

        class _Handle(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        self._server = socketserver.ThreadingTCPServer((host, port), _Handle, bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.allow_reuse_address = True
        self._server.server_bind()
        self._server.server_activate()
        bound_host, bound_port = self._server.server_address[:2]
        self._address = f"{bound_host!s}:{bound_port}"  # an AF_INET server's host is a str
        # Request threads inherit this thread's CPUs: all of the process's, not the engine's one.
        self._thread = start_thread(lambda: self._server.serve_forever(poll_interval=0.2), "kvbm-side-channel")

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return self._address

    def close(self) -> None:
        """Stop accepting requests and join the server thread. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(self._timeout_s)
        try:
            req = _recv(sock)
            handler = self._handlers.get(str(req.get("op")))
            if handler is None:
                reply = {"ok": False, "error": f"unknown op {req.get('op')!r}"}
            else:
                try:
                    reply = {"ok": True, **handler(req)}
                except (KeyError, ValueError, TypeError, RemoteError) as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            _send(sock, reply)
        except (OSError, ValueError):
            pass  # the client went away or sent garbage; it will time out on its side


def _send(sock: socket.socket, payload: Mapping[str, Any]) -> None:
    data = json.dumps(payload, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv(sock: socket.socket) -> dict[str, Any]:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    obj = json.loads(_recv_exact(sock, size))
    if not isinstance(obj, dict):
        raise ValueError("a frame must hold a JSON object")
    return obj


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
