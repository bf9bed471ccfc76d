"""The router's configuration: one frozen, validated value, parsed once.

Everything below :class:`RouterConfig` reads typed fields, never raw dicts or the
environment. Construction raises ``ValueError`` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math

LOOPBACK_HOSTS = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How the OpenAI-compatible router listens, validates and forwards.

    Attributes:
        model_name: the one model name clients send and ``/v1/models`` lists; workers
            must serve it under the same name.
        host: address to bind; loopback by default.
        port: TCP port; 0 lets the OS pick one (see ``RouterServer.port``).
        admin_token: bearer token the ``/admin`` routes require; mandatory when ``host``
            is not loopback, optional (but then enforced) on loopback.
        max_body_bytes: largest request body accepted (413 beyond it).
        max_tokens_cap: largest ``max_tokens``/``max_completion_tokens`` accepted.
        request_timeout_s: limit on one worker exchange (connect to last byte of a
            non-streaming reply, or between two chunks of a stream); also the longest a
            drain call waits.
        health_interval_s: period of the background ``/health`` probe of every worker.
        latency_window: how many recent TTFT/ITL samples the percentiles are taken over.
        queue_size: most requests that wait at once for a worker when none can take them
            (none healthy, all draining, none registered); one more gets a 503 at once.
            0: no waiting, a 503 at once.
        queue_timeout_s: longest a request waits there before its 503.
    """

    model_name: str
    host: str = "127.0.0.1"
    port: int = 0
    admin_token: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 4096
    request_timeout_s: float = 120.0
    health_interval_s: float = 2.0
    latency_window: int = 10_000
    queue_size: int = 256
    queue_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.admin_token is not None and (not isinstance(self.admin_token, str) or len(self.admin_token) < 8):
            raise ValueError("admin_token must be a string of at least 8 characters or None")
        if self.admin_token is None and not is_loopback(self.host):
            raise ValueError(f"admin_token is required when host is not loopback (host={self.host!r})")
        for name in ("max_body_bytes", "max_tokens_cap", "latency_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        size = self.queue_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"queue_size must be an integer >= 0, got {self.queue_size!r}")
        for name in ("request_timeout_s", "health_interval_s", "queue_timeout_s"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not value > 0
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
