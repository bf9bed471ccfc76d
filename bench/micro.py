"""The micro benchmarks as the suite runs them: each in a process of its own (as run by
hand; vLLM and NIXL state stay out of the suite's process), its Markdown tables parsed
back, and the columns that are ratios to its floor picked out for the plot.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
_SEPARATOR = re.compile(r"^\|[-:| ]+\|$")
# Log lines vLLM, NIXL and torch print on stdout ("(MainProcess pid=1) INFO ...",
# "2026-01-01 12:00:00 NIXL INFO ...", "[W101 12:00:00 ...]"): not results.
_LOG_LINE = re.compile(r"^(\([\w-]+ pid=\d+\) |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d |\[[WIE]\d{4} )")


@dataclasses.dataclass(frozen=True)
class Micro:
    """One benchmark module and how to read its first table.

    Attributes:
        name: the suite's name for it.
        module: ``python -m`` target.
        full, quick: its arguments in a full and a smoke run ({scratch} is replaced).
        labels: columns that name a row.
        ratios: columns that are ratios to the floor.
        goal: the ratio the README sets as goal (None: report only).
    """

    name: str
    module: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    labels: tuple[str, ...] = ()
    ratios: tuple[str, ...] = ()
    goal: float | None = None
    skip_rows: tuple[str, ...] = ()  # "path" values of floor rows, left out of the ratios


MICROS = (
    Micro(
        "hashing",
        "bench.hashing",
        (),
        ("--tokens", "4096", "--repeat", "3"),
        ("block",),
        ("int64/bare", "int32/bare"),
        1.5,
    ),
    Micro(
        "G1 <-> G2",
        "bench.transfer",
        (),
        ("--sizes-kib", "64", "--counts", "256"),
        ("KiB", "blocks", "layers"),
        ("offload/floor", "onboard/floor"),
        0.8,
    ),
    Micro(
        "G2 <-> G3",
        "bench.disk",
        ("--dir", "{scratch}/kvbm-bench-g3"),
        (
            "--dir",
            "{scratch}/kvbm-bench-g3",
            "--sizes-kib",
            "64",
            "--mib",
            "32",
            "--repeat",
            "1",
            "--index-entries",
            "4096",
        ),
        ("KiB", "blocks"),
        ("write/floor", "G3->G2/floor 4"),
        0.8,
    ),
    Micro(
        "remote pull",
        "bench.remote_pull",
        (),
        ("--shapes", "64x64K", "--repeat", "2", "--rounds", "20"),
        ("blocks", "ids", "path"),
        ("x memcpy",),
        0.75,
        skip_rows=("memcpy", "scattered copy", "h2d copy"),
    ),
    Micro("bookkeeping", "bench.bookkeeping", (), ("--slots", "4096", "--repeat", "1"), ("operation",), ("ratio",)),
)

CONNECTOR_TTFT = Micro(
    "connector TTFT",
    "bench.connector_ttft",
    ("--repeats", "3"),
    ("--model", "tiny", "--prompt-tokens", "1024", "--repeats", "1", "--throughput-prompts", "2", "--settle", "0.2"),
)


def run(micro: Micro, quick: bool, scratch: Path) -> dict:
    """Runs one benchmark; its command, output, tables and ratios, or its error."""
    args = [a.replace("{scratch}", str(scratch)) for a in (micro.quick if quick else micro.full)]
    command = [sys.executable, "-m", micro.module, *args]
    env = {**os.environ, "KVBM_BENCH_DIR": str(scratch)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    out: dict[str, Any] = {
        "command": "python -m " + " ".join([micro.module, *args]),
        "seconds": time.perf_counter() - start,
        "output": "\n".join(line for line in done.stdout.splitlines() if not _LOG_LINE.match(line)).strip(),
    }
    if done.returncode != 0:
        out["error"] = f"exit {done.returncode}: " + "\n".join(done.stderr.strip().splitlines()[-15:])
        return out
    out["tables"] = parse_tables(done.stdout)
    out["ratios"] = ratios(micro, out["tables"][0]) if micro.ratios and out["tables"] else []
    out["goal"] = micro.goal
    return out


def parse_tables(text: str) -> list[dict]:
    """Every Markdown table in ``text``: its title (the line before it), headers and rows."""
    lines = text.splitlines()
    tables = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and _SEPARATOR.match(lines[i + 1].strip()):
            title = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            tables.append({"title": title, "headers": _cells(lines[i]), "rows": rows})
            i = j
        else:
            i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def ratios(micro: Micro, table: dict) -> list[tuple[str, str, float]]:
    """(row label, column, value) for each ratio column of each row."""
    headers = table["headers"]
    out = []
    for row in table["rows"]:
        cells = dict(zip(headers, row))
        if cells.get("path") in micro.skip_rows:
            continue
        label = ", ".join(
            cells[h] if not _is_number(cells[h]) else f"{h} {cells[h]}" for h in micro.labels if h in cells
        )
        out += [(label, column, float(cells[column])) for column in micro.ratios if _is_number(cells.get(column, ""))]
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
