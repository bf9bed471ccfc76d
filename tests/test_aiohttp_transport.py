"""The router's httpx-over-aiohttp transport against a real HTTP server on 127.0.0.1: bodies
and headers intact, streams relayed as they come, connections kept alive, and every kind of
failure raised as the httpx exception the router tells apart."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from kvbm.serving.aiohttp_transport import AiohttpTransport
from kvbm.serving.forwarding import CONNECTION_LOST


class Server:
    """A tiny HTTP/1.1 server: ``handler(reader, writer, request_head, body)`` answers each
    request; connections are counted."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if not await self.handler(reader, writer, head, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(body: bytes, status: str = "200 OK", content_type: str = "application/json") -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def run(coroutine):
    return asyncio.run(coroutine)


def client(**kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AiohttpTransport(), **kwargs)


def test_a_post_arrives_whole_and_its_answer_comes_back_on_one_kept_connection():
    async def echo(reader, writer, head, body):
        writer.write(answer(json.dumps({"got": json.loads(body), "head": head.decode()}).encode()))
        await writer.drain()
        return True

    async def go():
        server = Server(echo)
        async with server as url, client() as http:
            first = await http.post(url + "/v1/completions", json={"prompt": "x" * 5000}, headers={"x-a": "1"})
            second = await http.post(url + "/v1/completions", json={"prompt": "y"})
        return server, first, second

    server, first, second = run(go())
    assert first.status_code == 200 and first.json()["got"] == {"prompt": "x" * 5000}
    assert "x-a: 1" in first.json()["head"].lower() and first.headers["content-type"] == "application/json"
    assert second.json()["got"] == {"prompt": "y"}
    assert server.connections == 1  # kept alive


def test_a_stream_is_relayed_as_it_comes_not_when_it_ends():
    async def sse(reader, writer, head, body):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(chunk(b"data: 1\n\n"))
        await writer.drain()
        await release.wait()  # the rest only once the client has the first event
        writer.write(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def go():
        async with Server(sse) as url, client() as http:
            reply = await http.send(http.build_request("POST", url + "/s", json={}), stream=True)
            chunks = []
            async for piece in reply.aiter_raw():
                chunks.append(piece)
                release.set()
            await reply.aclose()
            again = await http.post(url + "/s", json={})  # the connection went back whole
        return chunks, again

    release = asyncio.Event()
    chunks, again = run(go())
    assert chunks[0] == b"data: 1\n\n" and b"".join(chunks) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert again.status_code == 200


def test_a_refused_connection_is_a_connect_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused

        async def go():
            async with client() as http:
                await http.get(f"http://127.0.0.1:{port}/health")

        with pytest.raises(httpx.ConnectError):
            run(go())


def test_a_silent_server_is_a_read_timeout():
    async def silent(reader, writer, head, body):
        await asyncio.sleep(30)
        return False

    async def go():
        async with Server(silent) as url, client() as http:
            await http.get(url + "/health", timeout=0.3)

    with pytest.raises(httpx.ReadTimeout):
        run(go())


@pytest.mark.parametrize("how", ["before the answer", "mid-body"])
def test_a_server_that_closes_the_connection_is_a_lost_connection(how):
    async def closing(reader, writer, head, body):
        if how == "mid-body":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100\r\n\r\ndata: 1")
            await writer.drain()
        return False  # closes

    async def go():
        async with Server(closing) as url, client() as http:
            reply = await http.send(http.build_request("POST", url + "/s", json={}), stream=True)
            try:
                return [piece async for piece in reply.aiter_raw()]
            finally:
                await reply.aclose()

    with pytest.raises(CONNECTION_LOST):
        run(go())


def test_a_stream_left_half_read_closes_its_connection_and_the_next_request_opens_one():
    async def endless(reader, writer, head, body):
        if b"/short" in head:
            writer.write(answer(b"{}"))
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(1000):
            writer.write(chunk(b"data: x\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)
        return True

    async def go():
        server = Server(endless)
        async with server as url, client() as http:
            reply = await http.send(http.build_request("POST", url + "/s", json={}), stream=True)
            async for _ in reply.aiter_raw():
                break  # the client went away
            await reply.aclose()
            after = await http.post(url + "/short", json={})
        return server, after

    server, after = run(go())
    assert after.status_code == 200 and server.connections == 2
