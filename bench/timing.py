"""Timing and table printing shared by the benchmarks.

Machines here are shared and noisy (±30%), so every figure is the best of several runs and
the candidate and its floor are timed alternately, so drift affects both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence


def best_of(fns: Mapping[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best wall time (s) of each function over ``repeat`` rounds, interleaved round by round."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(f"\n{title}")
    print(format_table(headers, rows))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns right-aligned, floats to 3 significant digits."""
    cells = [[str(h) for h in headers]] + [[_fmt(c).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for i, row in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
