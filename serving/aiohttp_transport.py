"""An httpx transport that sends over an aiohttp session: the router's connections to workers.

Why: under 64 streams the router spent most of its time in httpcore's connection pool, which
scans every pooled connection (a ``select`` on each idle socket, ``getpeername``, ``is_idle``)
for every request it assigns and every response it closes. aiohttp's connector keeps idle
connections per host in a queue and parses HTTP in C. The router keeps httpx's API (its
requests, responses, timeouts and exception classes, and the tests' ``MockTransport``); only
the bytes go through aiohttp.

Contract:
    * One :class:`aiohttp.ClientSession` per transport, made on first use inside the running
      event loop, closed by :meth:`AiohttpTransport.aclose` (the ``AsyncClient``'s exit).
    * Idle connections are kept per host and close after ``keepalive_expiry`` seconds; no
      limit on connections (the router bounds requests itself).
    * httpx's per-request timeouts apply: ``connect`` to opening a connection, ``read`` to
      each wait for bytes (not the whole body: a long stream that keeps producing is fine).
    * aiohttp's failures surface as the httpx exceptions the router tells apart: a refused
      or failed connect is :class:`httpx.ConnectError`, a connect or read past its timeout
      :class:`httpx.ConnectTimeout` / :class:`httpx.ReadTimeout`, a peer that closed before or
      during its answer :class:`httpx.RemoteProtocolError` / :class:`httpx.ReadError`.
    * Bodies are not decompressed and redirects are not followed (a worker sends neither).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx


@contextlib.contextmanager
def httpx_errors(request: httpx.Request) -> Iterator[None]:
    """Re-raises aiohttp's failures as the httpx exception of the same meaning."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as error:
        raise httpx.ConnectTimeout(str(error) or "connect timed out", request=request) from error
    except (aiohttp.SocketTimeoutError, asyncio.TimeoutError) as error:
        raise httpx.ReadTimeout(str(error) or "read timed out", request=request) from error
    except aiohttp.ClientConnectorError as error:
        raise httpx.ConnectError(str(error), request=request) from error
    except aiohttp.ServerDisconnectedError as error:
        raise httpx.RemoteProtocolError(str(error) or "server disconnected", request=request) from error
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as error:
        raise httpx.ReadError(str(error), request=request) from error
    except aiohttp.ClientResponseError as error:  # a malformed answer
        raise httpx.RemoteProtocolError(str(error), request=request) from error
    except aiohttp.ClientConnectionError as error:  # e.g. a write on a connection being closed
        raise httpx.ReadError(str(error) or type(error).__name__, request=request) from error
    except aiohttp.ClientError as error:
        raise httpx.TransportError(f"{type(error).__name__}: {error}", request=request) from error


class _Body(httpx.AsyncByteStream):
    """An aiohttp response's body as httpx reads it; closing it returns the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # back to the pool
        else:
            self._response.close()  # a body left half read: the connection cannot carry another


class AiohttpTransport(httpx.AsyncBaseTransport):
    """See the module contract.

    Args:
        keepalive_expiry: seconds an idle connection is kept.
    """

    def __init__(self, keepalive_expiry: float = 2.0) -> None:
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive_expiry)
        # httpx decodes the body by its content-encoding header, so aiohttp must not.
        # httpx keeps the cookies (the router sends none); a second jar here would add its own.
        return aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._open_session()
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.get("connect"), sock_read=timeouts.get("read")
        )
        with httpx_errors(request):
            response = await self._session.request(
                request.method,
                str(request.url),
                headers=list(request.headers.multi_items()),
                data=await request.aread() or None,
                allow_redirects=False,
                timeout=timeout,
            )
        return httpx.Response(
            response.status, headers=list(response.raw_headers), stream=_Body(response, request), request=request
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
