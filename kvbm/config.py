"""kvbm configuration: one frozen dataclass, validated once at construction.

``KvbmConfig.from_dict`` is the entry point for vLLM's ``kv_connector_extra_config``: every key
must be a field below (an unknown key raises :class:`~kvbm.errors.ConfigError` naming it),
sizes may be integers or strings such as ``"8GiB"``, enums are given by value
(``"write_through"``). Below this module nothing reads raw dicts or environment variables.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Collection, Mapping
from typing import Any

from kvbm.errors import ConfigError
from kvbm.manager.policy import OffloadPolicy

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
_SIZE_FIELDS = ("g2_capacity_bytes", "cuda_staging_bytes", "g3_capacity_bytes")
_MAX_IO_THREADS = 64


class G3OnMismatch(enum.Enum):
    """What opening ``g3_dir`` does when the directory was written under another layout
    fingerprint, block size, capacity or format version: it is never served from."""

    REFUSE = "refuse"  # raise, naming what differs; the files are left alone
    WIPE = "wipe"  # delete kvbm's own files in the directory and start empty


@dataclasses.dataclass(frozen=True)
class KvbmConfig:
    """Validated kvbm settings. See the README's configuration table for each field.

    Raises:
        ConfigError: at construction, naming the first wrong field.
    """

    g2_capacity_bytes: int | None = None
    g2_capacity_blocks: int | None = None
    offload_policy: OffloadPolicy = OffloadPolicy.WRITE_THROUGH
    offload_min_hits: int = 0
    verify_g2_reads: bool = True
    transfer_thread: bool = True
    latency_window: int = 1024
    event_buffer: int = 65536
    cuda_staging_bytes: int = 64 << 20
    g3_dir: str | None = None
    g3_capacity_bytes: int | None = None
    g3_on_mismatch: G3OnMismatch = G3OnMismatch.REFUSE
    g3_direct_io: bool = True
    g3_io_threads: int = 4

    def __post_init__(self) -> None:
        if (self.g2_capacity_bytes is None) == (self.g2_capacity_blocks is None):
            raise ConfigError(
                "g2_capacity_bytes",
                "set exactly one of g2_capacity_bytes and g2_capacity_blocks",
            )
        for name in ("g2_capacity_bytes", "g2_capacity_blocks", "g3_capacity_bytes"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("offload_min_hits", self.offload_min_hits, minimum=0)
        _check_int("latency_window", self.latency_window, minimum=1)
        _check_int("event_buffer", self.event_buffer, minimum=0)
        _check_int("cuda_staging_bytes", self.cuda_staging_bytes, minimum=1)
        if not isinstance(self.offload_policy, OffloadPolicy):
            raise ConfigError("offload_policy", f"expected OffloadPolicy, got {self.offload_policy!r}")
        _check_int("g3_io_threads", self.g3_io_threads, minimum=1)
        if self.g3_io_threads > _MAX_IO_THREADS:
            raise ConfigError("g3_io_threads", f"must be <= {_MAX_IO_THREADS}, got {self.g3_io_threads}")
        if not isinstance(self.g3_on_mismatch, G3OnMismatch):
            raise ConfigError("g3_on_mismatch", f"expected G3OnMismatch, got {self.g3_on_mismatch!r}")
        for name in ("verify_g2_reads", "transfer_thread", "g3_direct_io"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"expected a bool, got {getattr(self, name)!r}")
        if self.g3_dir is not None and (not isinstance(self.g3_dir, str) or not self.g3_dir):
            raise ConfigError("g3_dir", f"expected a non-empty path string, got {self.g3_dir!r}")
        if (self.g3_dir is None) != (self.g3_capacity_bytes is None):
            raise ConfigError("g3_dir", "g3_dir and g3_capacity_bytes are set together or not at all")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> KvbmConfig:
        """Build a config from a plain dict (JSON types), e.g. vLLM's kv_connector_extra_config.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or an invalid value.
        """
        values: dict[str, Any] = {}
        for key, value in checked_keys(raw, {f.name for f in dataclasses.fields(cls)}, "kvbm config").items():
            if key in _SIZE_FIELDS and value is not None:
                value = parse_size(key, value)
            elif key == "offload_policy":
                value = _parse_enum(key, OffloadPolicy, value)
            elif key == "g3_on_mismatch":
                value = _parse_enum(key, G3OnMismatch, value)
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``from_dict(cfg.to_dict()) == cfg``."""
        out = dataclasses.asdict(self)
        out["offload_policy"] = self.offload_policy.value
        out["g3_on_mismatch"] = self.g3_on_mismatch.value
        return out

    def g2_slots(self, block_bytes: int) -> int:
        """Number of G2 slots for blocks of ``block_bytes`` bytes.

        Raises:
            ValueError: ``block_bytes`` is not positive.
            ConfigError: the byte capacity cannot hold a single block.
        """
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        if self.g2_capacity_blocks is not None:
            return self.g2_capacity_blocks
        assert self.g2_capacity_bytes is not None
        slots = self.g2_capacity_bytes // block_bytes
        if slots < 1:
            raise ConfigError(
                "g2_capacity_bytes",
                f"{self.g2_capacity_bytes} bytes cannot hold one block of {block_bytes} bytes",
            )
        return slots


def checked_keys(raw: Any, known: Collection[str], where: str) -> dict[str, Any]:
    """``raw`` as a dict, once it is a mapping whose every key is in ``known``.

    Raises:
        TypeError: ``raw`` is not a mapping.
        ConfigError: an unknown key (the message lists the known ones).
    """
    if not isinstance(raw, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in known:
            raise ConfigError(str(key), f"unknown key in {where}; known keys: {', '.join(sorted(known))}")
    return dict(raw)


def parse_size(field: str, value: Any) -> int:
    """Parse a byte size: a non-negative int, or a string such as ``"512MiB"`` or ``"2GB"``.

    Raises:
        ConfigError: naming ``field`` when the value is not a size.
    """
    if isinstance(value, bool):
        raise ConfigError(field, f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    raise ConfigError(field, f"expected bytes as an int or a string like '8GiB', got {value!r}")


def _parse_enum(field: str, kind: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(p.value) for p in kind)
        noun = "policy" if kind is OffloadPolicy else "value"
        raise ConfigError(field, f"unknown {noun} {value!r}; choose one of {choices}") from None


def _check_int(field: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an int, got {value!r}")
    if value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}")
