"""Sends one validated request through the workers: aggregated, or prefill then decode.

Contract (see DESIGN.md, "Disaggregated flow"):
    0. While no decode-capable worker (DECODE or AGGREGATED) can take the request, it waits
       in the :class:`~kvbm.serving.admission.AdmissionQueue` (bounded in size and time; a
       503 when full or timed out), before the prefill hop and again before the final hop
       if the one it had left meanwhile.
    1. When an ACTIVE, healthy prefill worker and a decode-capable worker (DECODE or
       AGGREGATED) are both up, the request first goes to the prefill worker (chosen by
       KV-prefix overlap, then load) with ``max_tokens=1``, ``stream=false`` and
       ``kv_transfer_params={"do_remote_decode": true}``; the ``kv_transfer_params`` it
       returns are added to the request for the decode hop. A prefill worker that fails
       leaves rotation and the request runs aggregated (decode recomputes); one that
       answers without ``kv_transfer_params`` just means decode recomputes too.
    2. The final hop goes to the least loaded decode-capable worker. A worker that fails
       before any byte reached the client (connection error, timeout, 5xx, a stream that
       ends before its first chunk) leaves rotation (the health probe brings it back) and
       the request is retried once on another worker; after that the client gets a 502.
       A worker's own 4xx passes through unchanged. A lost connection is not enough to
       take a worker out: unless its ``/health`` is refused or fails it stays in rotation and
       may take the retry (with one decode worker, one reset connection would otherwise fail
       every request until the probe brought the worker back). Nor is a timeout when no other
       worker can take its hops (late is not dead, see health.py); the request is not retried
       on it then.
    3. Streams are relayed chunk by chunk; if the worker breaks mid-stream the client gets
       a final SSE ``error`` event (its status line is already sent).
    4. Every hop is bracketed by ``WorkerPool.acquire``/``release``, also on failure and on
       client disconnect, so drains see exact in-flight counts. Every answer below 500 and
       every relayed stream chunk is recorded as the worker's progress
       (``WorkerPool.progressed``: one timestamp, no parsing), which the health probe weighs.
    5. When the prefill handed off blocks (a kvbm ``Handoff`` in its ``kv_transfer_params``)
       and no decode worker accepted the request (its final answer is not 2xx, every try
       failed, none could take it, or the client went away first), the router sends the
       prefill's side channel one ``release`` for it, from a thread, without waiting for the
       answer: the prefill frees the blocks now instead of at the end of its hold. Retries on
       another decode worker come first; the release follows the last one. A decode that
       accepted the request pulls and releases the blocks itself. A failed release is only
       counted and logged (the hold runs out anyway). :meth:`Forwarder.close` waits for the
       releases still in flight.

``kv_transfer_params`` sent by a client are dropped: the router owns that field.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvbm.connectors.vllm.handoff import Handoff
from kvbm.remote import exchange
from kvbm.serving.admission import AdmissionQueue
from kvbm.serving.health import Health, check_health
from kvbm.serving.router_stats import ErrorKind, Hop, RouterStats
from kvbm.serving.router_validation import Endpoint, RequestError
from kvbm.serving.routing import PublishedHashes, choose_by_load, choose_prefill, no_published_hashes
from kvbm.serving.workers import DECODE_ROLES, Worker, WorkerPool, WorkerRole

logger = logging.getLogger(__name__)
PromptHashes = Callable[[dict], Sequence[Hashable]]
MAX_ATTEMPTS = 2  # the first try and one retry
HEALTH_CHECK_S = 2.0
# A connection the worker closed or reset under the request: a keep-alive connection it timed
# out just as the request went out, or a lost request. The worker may be fine.
CONNECTION_LOST = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
RELEASE_TIMEOUT_S = 2.0  # one side-channel release; past it the prefill's hold runs out anyway
# Releases have their own threads: a silent prefill side channel must not hold up the event
# loop's default executor (worker start polls, process stops).
RELEASE_THREADS = 2


def no_prompt_hashes(body: dict) -> Sequence[Hashable]:
    """The default :data:`PromptHashes`: the router does not tokenize, so no hashes."""
    return ()


class Forwarder:
    """Routes requests over a :class:`WorkerPool` with one shared HTTP client.

    Args:
        pool: the worker registry.
        stats: where outcomes are counted.
        client: the HTTP client (its timeout bounds every worker exchange).
        prompt_hashes: request body -> the prompt's chained block hashes.
        published: worker id -> the block hashes that worker holds.
        clock: monotonic seconds (tests may inject one).
        admission: where requests wait for a worker; None: they get a 503 at once.
    """

    def __init__(
        self,
        pool: WorkerPool,
        stats: RouterStats,
        client: httpx.AsyncClient,
        prompt_hashes: PromptHashes = no_prompt_hashes,
        published: PublishedHashes = no_published_hashes,
        clock: Callable[[], float] = time.monotonic,
        admission: AdmissionQueue | None = None,
    ) -> None:
        self._pool = pool
        self._stats = stats
        self._client = client
        self._prompt_hashes = prompt_hashes
        self._published = published
        self._clock = clock
        if admission is None:  # no waiting room: the request that no worker can take fails
            admission = AdmissionQueue(pool, stats, size=0, timeout_s=0.0)
        self._admission = admission
        self._releases: set[asyncio.Future] = set()
        self._release_pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def forward(self, endpoint: Endpoint, body: dict, received_at: float) -> Response:
        """Answers one validated request (see the module contract).

        Raises:
            RequestError: 503 when no worker could take it within the admission queue's
                room and timeout, 502 when the tried ones failed.
        """
        body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
        hop = Hop.AGGREGATED
        await self._admission.wait(DECODE_ROLES)  # a prefill hop is wasted without a decode
        prefill_candidates = self._pool.candidates([WorkerRole.PREFILL])
        if prefill_candidates:
            # Tokenizing costs the request time; with one candidate there is nothing to choose.
            hashes = self._prompt_hashes(body) if len(prefill_candidates) > 1 else ()
            prefill = choose_prefill(prefill_candidates, hashes, self._published)
            assert prefill is not None  # there were candidates
            body = await self._prefill(prefill, endpoint, body)
            hop = Hop.DECODE
        handoff = Handoff.from_params(body.get("kv_transfer_params"))
        accepted = False
        try:
            response = await self._final(endpoint, body, received_at, hop)
            accepted = 200 <= response.status_code < 300
            return response
        finally:  # also on RequestError and on cancellation (the client went away)
            if handoff is not None and not accepted:
                self._release(handoff)

    async def close(self) -> None:
        """Waits for the releases still in flight (each ends within its timeout), then stops
        their threads. Call it from the event loop, once no request is being forwarded."""
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        if self._release_pool is not None:
            self._release_pool.shutdown(wait=False)
            self._release_pool = None

    def _release(self, handoff: Handoff) -> None:
        """Sends the prefill worker the ``release`` of ``handoff`` from a thread; the answer
        is counted when it comes."""
        if self._release_pool is None:
            self._release_pool = concurrent.futures.ThreadPoolExecutor(
                RELEASE_THREADS, thread_name_prefix="kvbm-router-release"
            )
        future = asyncio.get_running_loop().run_in_executor(
            self._release_pool,
            exchange.request_release,
            handoff.source,
            (handoff.release_hash,),
            RELEASE_TIMEOUT_S,
            *((handoff.grant.lease_id, handoff.grant.source) if handoff.grant is not None else (None, None)),
        )
        self._releases.add(future)
        future.add_done_callback(lambda done: self._released(handoff, done))

    def _released(self, handoff: Handoff, done: asyncio.Future) -> None:
        self._releases.discard(done)
        if done.cancelled():
            return  # the loop is shutting down; the thread still sends it
        error = done.exception()
        if error is None:
            self._stats.handoffs_released += 1
            return
        self._stats.handoff_release_failures += 1
        logger.warning(
            "could not release the handoff held by %s (%s: %s); it is freed when its hold runs out",
            handoff.source,
            type(error).__name__,
            error,
        )

    async def _prefill(self, worker: Worker, endpoint: Endpoint, body: dict) -> dict:
        """First hop; returns the body for the decode hop."""
        first = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
        if "max_completion_tokens" in first:
            first["max_completion_tokens"] = 1
        first.pop("stream_options", None)
        self._pool.acquire(worker)
        self._stats.count_route(worker.id, Hop.PREFILL)
        sent_at = self._clock()
        try:
            reply = await self._client.post(worker.url + endpoint.value, json=first)
        except httpx.HTTPError as error:
            await self._failed(worker, error)
            self._stats.count_error(ErrorKind.PREFILL_FAILED)
            return body
        finally:
            self._pool.release(worker)
        if reply.status_code >= 500:
            self._pool.mark(worker, healthy=False, reason=f"prefill answered HTTP {reply.status_code}")
        else:
            now = self._clock()
            self._pool.progressed(worker, now)
            if reply.status_code < 400:  # a refused request answers fast: not a prefill's time
                self._stats.record_prefill(now - sent_at)
        if reply.status_code >= 400:
            self._stats.count_error(ErrorKind.PREFILL_FAILED)
            return body
        try:
            params = reply.json().get("kv_transfer_params")
        except (ValueError, AttributeError):
            self._stats.count_error(ErrorKind.PREFILL_FAILED)
            return body
        if not isinstance(params, dict):
            self._stats.count_error(ErrorKind.KV_PARAMS_MISSING)
            return body
        self._stats.disaggregated += 1
        return dict(body, kv_transfer_params=params)

    async def _final(self, endpoint: Endpoint, body: dict, received_at: float, hop: Hop) -> Response:
        tried: list[str] = []
        excluded: list[str] = []
        reasons: list[str] = []
        for attempt in range(MAX_ATTEMPTS):
            if not tried:  # the decode worker seen before the prefill hop may have left since
                await self._admission.wait(DECODE_ROLES)
            worker = choose_by_load(self._pool.candidates(DECODE_ROLES, exclude=excluded))
            if worker is None:
                break
            if attempt:
                self._stats.retries += 1
            tried.append(worker.id)
            self._pool.acquire(worker)
            self._stats.count_route(worker.id, hop)
            if body.get("stream"):
                response, failure = await self._stream(worker, endpoint, body, received_at)
            else:
                response, failure = await self._unary(worker, endpoint, body, received_at)
            if response is not None:
                return response
            assert failure is not None  # no answer comes with its failure
            self._stats.count_error(ErrorKind.WORKER_FAILED)
            reasons.append(f"{worker.id} ({worker.url}): {type(failure).__name__}: {failure}")
            stays = await self._failed(worker, failure)
            # A worker that stays in rotation after a timeout does not get the request again:
            # it would wait as long a second time.
            if not stays or isinstance(failure, httpx.TimeoutException):
                excluded.append(worker.id)
        raise RequestError(
            502, "worker(s) failed before answering: " + "; ".join(reasons), "worker_failed", type_="bad_gateway"
        )

    async def _failed(self, worker: Worker, failure: Exception) -> bool:
        """Takes a worker that failed a request out of rotation, unless it only lost the
        connection and its ``/health`` is not refused, or it was late and no other worker can
        take its hops; True when it stays in."""
        if isinstance(failure, httpx.TimeoutException) and not self._pool.alternatives(worker):
            logger.warning(
                "worker %s (%s) timed out (%s: %s) but no other worker can take its requests; it stays in rotation",
                worker.id,
                worker.url,
                type(failure).__name__,
                failure,
            )
            return True  # late is not dead: the probe takes it out only when it is down
        if (
            isinstance(failure, CONNECTION_LOST)
            and await check_health(self._client, worker, HEALTH_CHECK_S) is not Health.DOWN
        ):
            logger.warning(
                "worker %s (%s) lost a connection (%s: %s) but is not down; it stays in rotation",
                worker.id,
                worker.url,
                type(failure).__name__,
                failure,
            )
            return True  # alive, perhaps busy: the probe takes it out if it stays silent
        self._pool.mark(worker, healthy=False, reason=f"{type(failure).__name__}: {failure}")
        return False

    def _passthrough(self, reply: httpx.Response, content: bytes) -> Response:
        if reply.status_code >= 400:
            self._stats.count_error(ErrorKind.UPSTREAM_4XX)
        else:
            self._stats.succeeded += 1
        return Response(
            content=content,
            status_code=reply.status_code,
            media_type=reply.headers.get("content-type", "application/json"),
        )

    async def _unary(
        self, worker: Worker, endpoint: Endpoint, body: dict, received_at: float
    ) -> tuple[Response | None, Exception | None]:
        try:
            reply = await self._client.post(worker.url + endpoint.value, json=body)
        except httpx.HTTPError as error:
            return None, error
        finally:
            self._pool.release(worker)
        if reply.status_code >= 500:
            return None, _Failed(f"HTTP {reply.status_code}")
        now = self._clock()
        self._pool.progressed(worker, now)
        self._stats.record_ttft(now - received_at)
        return self._passthrough(reply, reply.content), None

    async def _stream(
        self, worker: Worker, endpoint: Endpoint, body: dict, received_at: float
    ) -> tuple[Response | None, Exception | None]:
        request = self._client.build_request("POST", worker.url + endpoint.value, json=body)
        reply: httpx.Response | None = None
        try:
            reply = await self._client.send(request, stream=True)
            if reply.status_code >= 500:
                raise _Failed(f"HTTP {reply.status_code}")
            if reply.status_code >= 400:
                content = await reply.aread()
                await reply.aclose()
                self._pool.progressed(worker, self._clock())
                self._pool.release(worker)
                return self._passthrough(reply, content), None
            chunks = reply.aiter_raw()
            first = await anext(chunks, None)
            if first is None:
                raise _Failed("stream ended before its first chunk")
        except (httpx.HTTPError, _Failed) as error:
            if reply is not None:
                await reply.aclose()
            self._pool.release(worker)
            return None, error
        now = self._clock()
        self._pool.progressed(worker, now)
        self._stats.record_ttft(now - received_at)
        return StreamingResponse(
            self._relay(worker, reply, chunks, first),
            status_code=reply.status_code,
            media_type=reply.headers.get("content-type", "text/event-stream"),
        ), None

    async def _relay(
        self, worker: Worker, reply: httpx.Response, chunks: AsyncIterator[bytes], first: bytes
    ) -> AsyncIterator[bytes]:
        try:
            yield first
            last = self._clock()
            async for chunk in chunks:
                now = self._clock()
                self._pool.progressed(worker, now)
                # TCP may coalesce several SSE events into one chunk (or split one event):
                # spread the gap over the token events the chunk completes.
                events = chunk.count(b"data: ") - chunk.count(b"data: [DONE]")
                if events:
                    for _ in range(events):
                        self._stats.record_itl((now - last) / events)
                    last = now
                yield chunk
            self._stats.succeeded += 1
        except httpx.HTTPError as error:
            await self._failed(worker, error)
            self._stats.count_error(ErrorKind.STREAM_BROKEN)
            event = {
                "error": {
                    "message": f"worker {worker.id} failed mid-stream: {error}",
                    "type": "bad_gateway",
                    "code": "stream_broken",
                    "param": None,
                }
            }
            yield f"data: {json.dumps(event)}\n\n".encode()
        finally:
            await reply.aclose()
            self._pool.release(worker)


class _Failed(Exception):
    """A worker answered in a way that counts as a failure (5xx, empty stream)."""


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.as_json(), status_code=error.status)
