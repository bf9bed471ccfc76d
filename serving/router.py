"""The OpenAI-compatible router: HTTP routes, admin API, health probe, and a runner.

Routes:
    POST /v1/completions, /v1/chat/completions   validated, then forwarded (see forwarding.py)
    GET  /v1/models, /health, /stats (JSON), /metrics (Prometheus text)
    GET  /admin/workers                          list
    POST /admin/workers {"role", "url"}          add a running worker (201)
    POST /admin/workers/{id}/drain               stop new requests; waits (at most
                                                 request_timeout_s) for in-flight ones;
                                                 200 when drained, 202 while still draining
    DELETE /admin/workers/{id}                   forget a drained worker (409 otherwise)

Admin routes need ``Authorization: Bearer <admin_token>`` whenever the config has a token
(it must have one when the router binds a non-loopback host).

Contract: :class:`Router` owns the pool, stats and FastAPI app; its HTTP client and health
probe live from app start-up to shut-down. :class:`RouterServer` runs a router with uvicorn
in a background thread (``start``/``stop``) or in the calling thread (``serve_forever``).
Process management (starting vLLM workers) stays with the caller: it starts workers, then
registers them with :meth:`Router.add_worker` before start, or ``POST /admin/workers`` after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import threading
import time
from collections.abc import Callable

import httpx
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from kvbm.serving.forwarding import Forwarder, PromptHashes, error_response, no_prompt_hashes
from kvbm.serving.router_config import RouterConfig
from kvbm.serving.router_stats import ErrorKind, RouterStats
from kvbm.serving.router_validation import Endpoint, RequestError, parse_request
from kvbm.serving.routing import PublishedHashes, no_published_hashes
from kvbm.serving.workers import Worker, WorkerPool, WorkerRole, WorkerState

DRAIN_POLL_S = 0.05
HEALTH_PROBE_TIMEOUT_S = 2.0


class Router:
    """One router instance.

    Args:
        config: validated settings.
        prompt_hashes: request body -> the prompt's chained block hashes (for KV-aware
            prefill choice); none by default.
        published: worker id -> the block hashes it holds; none by default.
        clock: monotonic seconds.
    """

    def __init__(self, config: RouterConfig, prompt_hashes: PromptHashes = no_prompt_hashes,
                 published: PublishedHashes = no_published_hashes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.pool = WorkerPool()
        self.stats = RouterStats(config.latency_window)
        self._prompt_hashes = prompt_hashes
        self._published = published
        self._clock = clock
        self._forwarder: Forwarder | None = None
        self.app = self._build_app()

    def add_worker(self, role: WorkerRole, url: str) -> Worker:
        """Registers a running worker (before start, or from the router's event loop).

        Raises:
            ValueError: bad or duplicate URL.
        """
        return self.pool.add(role, url)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        timeout = httpx.Timeout(self.config.request_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            self._forwarder = Forwarder(self.pool, self.stats, client, self._prompt_hashes,
                                        self._published, self._clock)
            probe = asyncio.create_task(self._probe_forever(client))
            try:
                yield
            finally:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe

    async def _probe_forever(self, client: httpx.AsyncClient) -> None:
        timeout = min(HEALTH_PROBE_TIMEOUT_S, self.config.health_interval_s)
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            workers = self.pool.all()
            verdicts = await asyncio.gather(*(self._probe(client, w, timeout) for w in workers))
            for worker, healthy in zip(workers, verdicts):
                if worker.healthy != healthy:
                    self.pool.mark(worker, healthy)

    @staticmethod
    async def _probe(client: httpx.AsyncClient, worker: Worker, timeout: float) -> bool:
        try:
            reply = await client.get(worker.url + "/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}",
                               "body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes",
                                   "body_too_large")
        return bytes(raw)

    async def _completion(self, request: Request, endpoint: Endpoint) -> Response:
        received_at = self._clock()
        self.stats.requests += 1
        try:
            body = parse_request(await self._read_body(request), endpoint, self.config)
        except RequestError as error:
            self.stats.count_error(ErrorKind.INVALID_REQUEST)
            return error_response(error)
        assert self._forwarder is not None, "the app's lifespan did not run"
        try:
            return await self._forwarder.forward(endpoint, body, received_at)
        except RequestError as error:
            return error_response(error)

    def _check_admin(self, request: Request) -> None:
        token = self.config.admin_token
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            self.stats.count_error(ErrorKind.UNAUTHORIZED)
            raise RequestError(401, "admin routes need 'Authorization: Bearer <admin_token>'",
                               "unauthorized", type_="authentication_error")

    def _worker(self, worker_id: str) -> Worker:
        try:
            return self.pool.get(worker_id)
        except KeyError:
            raise RequestError(404, f"no worker {worker_id!r}", "worker_not_found") from None

    async def _add(self, request: Request) -> Response:
        self._check_admin(request)
        try:
            spec = (await request.json())
            role = WorkerRole(spec["role"])
            worker = self.pool.add(role, spec["url"])
        except (ValueError, KeyError, TypeError) as error:
            raise RequestError(400, "body must be {\"role\": \"prefill\"|\"decode\"|\"aggregated\", "
                               f"\"url\": \"http://host:port\"}} ({error})", "invalid_worker") from None
        return JSONResponse(worker.as_json(), status_code=201)

    async def _drain(self, request: Request) -> Response:
        self._check_admin(request)
        worker = self._worker(request.path_params["worker_id"])
        self.pool.drain(worker.id)
        for _ in range(int(self.config.request_timeout_s / DRAIN_POLL_S) + 1):
            if worker.state is WorkerState.DRAINED:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        status = 200 if worker.state is WorkerState.DRAINED else 202
        return JSONResponse(worker.as_json(), status_code=status)

    async def _remove(self, request: Request) -> Response:
        self._check_admin(request)
        worker = self._worker(request.path_params["worker_id"])
        try:
            self.pool.remove(worker.id)
        except ValueError as error:
            raise RequestError(409, str(error), "worker_not_drained") from None
        return JSONResponse(worker.as_json())

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="kvbm router", lifespan=self._lifespan, docs_url=None,
                      redoc_url=None, openapi_url=None)
        app.add_exception_handler(RequestError, lambda _request, error: error_response(error))

        @app.post(Endpoint.COMPLETIONS.value)
        async def completions(request: Request) -> Response:
            return await self._completion(request, Endpoint.COMPLETIONS)

        @app.post(Endpoint.CHAT.value)
        async def chat(request: Request) -> Response:
            return await self._completion(request, Endpoint.CHAT)

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": [
                {"id": self.config.model_name, "object": "model", "owned_by": "kvbm"}]})

        @app.get("/health")
        async def health() -> Response:
            up = len(self.pool.candidates(list(WorkerRole)))
            return JSONResponse({"status": "ok", "workers_up": up})

        @app.get("/stats")
        async def stats() -> Response:
            return JSONResponse(self.stats.as_json(self.pool.all()))

        @app.get("/metrics")
        async def metrics() -> Response:
            return PlainTextResponse(self.stats.prometheus(self.pool.all()),
                                     media_type="text/plain; version=0.0.4")

        @app.get("/admin/workers")
        async def list_workers(request: Request) -> Response:
            self._check_admin(request)
            return JSONResponse([w.as_json() for w in self.pool.all()])

        app.add_api_route("/admin/workers", self._add, methods=["POST"])
        app.add_api_route("/admin/workers/{worker_id}/drain", self._drain, methods=["POST"])
        app.add_api_route("/admin/workers/{worker_id}", self._remove, methods=["DELETE"])
        return app


class RouterServer:
    """Runs a :class:`Router` under uvicorn on ``config.host``/``config.port``.

    The socket is bound in the constructor, so :attr:`port` is known (also for port 0)
    before start. Use either ``start``/``stop`` (background thread) or ``serve_forever``.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        config = router.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((config.host, config.port))
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(
            router.app, log_level="warning", lifespan="on", access_log=False,
            timeout_graceful_shutdown=max(1, int(config.request_timeout_s))))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.router.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serves in the calling thread until SIGINT/SIGTERM (main thread) or :meth:`stop`."""
        self._server.run(sockets=[self._socket])

    def start(self, poll_s: float = 0.02, max_polls: int = 1500) -> "RouterServer":
        """Serves in a daemon thread; returns once uvicorn accepts connections.

        Raises:
            RuntimeError: uvicorn did not start within ``poll_s * max_polls`` seconds.
        """
        self._thread = threading.Thread(target=self.serve_forever, name="kvbm-router", daemon=True)
        self._thread.start()
        for _ in range(max_polls):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                break
            time.sleep(poll_s)
        self.stop()
        raise RuntimeError(f"router on {self.url} did not start")

    def stop(self, join_s: float = 30.0) -> None:
        """Asks uvicorn to exit and joins its thread; idempotent."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(join_s)
            self._thread = None
        self._socket.close()

    def __enter__(self) -> "RouterServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
