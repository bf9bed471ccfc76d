"""The ``data:`` fields of a server-sent event stream (vLLM's and the router's streamed answers).

Per the SSE format, lines end at LF, CRLF or CR alone. Python's ``str.splitlines()``, which
``httpx``'s ``iter_lines``/``aiter_lines`` use, also breaks at characters a JSON string may
hold unescaped (U+0085, U+2028, U+2029): a model whose token decodes to one of them would cut
an event in two and make a valid stream look garbled (``bench.hot_path`` hit one every run of
its fourth 64-stream round). Everything here splits at line ends only.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Iterator

import httpx

_LINE_END = re.compile(rb"\r\n|\n|\r")
DONE = "[DONE]"  # the payload OpenAI-style streams end with


class DataLines:
    """Splits bytes fed in pieces into SSE lines and keeps the ``data:`` payloads.

    A CR at the end of a piece is held back: its LF may open the next piece.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        """The payloads of the ``data:`` lines ``chunk`` completes."""
        buffer = self._pending + chunk
        lines = _LINE_END.split(buffer)
        self._pending = lines.pop()
        if buffer.endswith(b"\r"):  # maybe half of a CRLF: decide with the next piece
            self._pending = lines.pop() + b"\r"
        return [payload for line in lines if (payload := _data(line)) is not None]

    def close(self) -> list[str]:
        """The payload of an unterminated last line, if it is a ``data:`` line."""
        rest, self._pending = self._pending, b""
        payload = _data(rest.rstrip(b"\r"))
        return [payload] if payload is not None else []


def _data(line: bytes) -> str | None:
    if not line.startswith(b"data:"):
        return None
    payload = line[5:]
    # As httpx decodes: a stream cut inside a character still yields its other events.
    return (payload[1:] if payload.startswith(b" ") else payload).decode("utf-8", errors="replace")


def data_of(body: str | bytes) -> list[str]:
    """Every ``data:`` payload of a whole stream body."""
    lines = DataLines()
    return lines.feed(body.encode("utf-8") if isinstance(body, str) else body) + lines.close()


def iter_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """The ``data:`` payloads of a stream read in pieces (e.g. ``reply.iter_bytes()``)."""
    lines = DataLines()
    for chunk in chunks:
        yield from lines.feed(chunk)
    yield from lines.close()


async def aiter_data(reply: httpx.Response) -> AsyncIterator[str]:
    """The ``data:`` payloads of a streamed ``httpx`` reply, as they arrive."""
    lines = DataLines()
    async for chunk in reply.aiter_bytes():
        for payload in lines.feed(chunk):
            yield payload
    for payload in lines.close():
        yield payload
