"""The OpenAI-compatible router: HTTP routes, admin API, health probe, and a runner.

Routes:
    POST /v1/completions, /v1/chat/completions   validated, then forwarded (see forwarding.py);
                                                 while no worker can take one it waits in
                                                 the admission queue (admission.py)
    GET  /v1/models, /health
    GET  /stats (JSON), /metrics (Prometheus)    the router's own figures and every worker's
                                                 block-pool stats (see router_stats.py)
    GET  /admin/workers                          list
    POST /admin/workers {"role", "url"[, "stats_url"]}
                                                 add a running worker (201)
    POST /admin/workers {"role"}                 launch one (needs a launcher, see below):
                                                 202, state "starting"; it joins the
                                                 rotation once healthy, or turns "failed"
    POST /admin/workers/{id}/drain               stop new requests; waits (at most
                                                 request_timeout_s) for in-flight ones,
                                                 then stops a launched worker's process;
                                                 200 when done, 202 while still draining
    DELETE /admin/workers/{id}                   forget a drained, stopped or failed worker
                                                 (409 otherwise)

Admin routes need ``Authorization: Bearer <admin_token>`` whenever the config has a token
(it must have one when the router binds a non-loopback host).

Contract: :class:`Router` owns the pool, stats and FastAPI app; its HTTP client and health
probe live from app start-up to shut-down. :class:`RouterServer` runs a router with uvicorn
in a background thread (``start``/``stop``) or in the calling thread (``serve_forever``).
Starting processes stays with the caller: it registers running workers with
:meth:`Router.add_worker`, or gives the router a :data:`~kvbm.serving.workers.Launcher`
(the serve command does) so that :meth:`Router.launch_worker` and the admin API can start
them. The router stops only processes it holds as launched, and only after a drain.
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

from kvbm.serving.admission import AdmissionQueue
from kvbm.serving.aiohttp_transport import AiohttpTransport
from kvbm.serving.forwarding import Forwarder, PromptHashes, error_response, no_prompt_hashes
from kvbm.serving.health import ProbeVerdicts, check_health
from kvbm.serving.router_config import RouterConfig
from kvbm.serving.router_stats import ErrorKind, RouterStats, WorkerReply, fetch_worker_stats
from kvbm.serving.router_validation import Endpoint, RequestError, parse_request
from kvbm.serving.routing import PublishedHashes, no_published_hashes
from kvbm.serving.workers import Launcher, Worker, WorkerPool, WorkerRole, WorkerState

DRAIN_POLL_S = 0.05
START_POLL_S = 0.5
HEALTH_PROBE_TIMEOUT_S = 2.0
WORKER_STATS_TIMEOUT_S = 1.0  # a worker's stats endpoint that takes longer shows an error
PROBED_STATES = (WorkerState.ACTIVE, WorkerState.DRAINING)
ADD_USAGE = (
    'body must be {"role": "prefill"|"decode"|"aggregated"} to launch a worker, or '
    'also "url": "http://host:port" (and optionally "stats_url") to add a running one'
)


class Router:
    """One router instance.

    Args:
        config: validated settings.
        prompt_hashes: request body -> the prompt's chained block hashes (for KV-aware
            prefill choice); none by default.
        published: worker id -> the block hashes it holds; none by default.
        launcher: starts worker processes on demand; None: workers can only be added by URL.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        config: RouterConfig,
        prompt_hashes: PromptHashes = no_prompt_hashes,
        published: PublishedHashes = no_published_hashes,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.pool = WorkerPool()
        self.stats = RouterStats(config.latency_window)
        self.admission = AdmissionQueue(self.pool, self.stats, config.queue_size, config.queue_timeout_s)
        self._prompt_hashes = prompt_hashes
        self._published = published
        self._launcher = launcher
        self._clock = clock
        self._client: httpx.AsyncClient | None = None
        self._forwarder: Forwarder | None = None
        self._tasks: set[asyncio.Task] = set()
        self._retiring: dict[str, asyncio.Task] = {}
        self.app = self._build_app()

    def add_worker(self, role: WorkerRole, url: str, stats_url: str | None = None) -> Worker:
        """Registers a running worker (before start, or from the router's event loop).

        Raises:
            ValueError: bad or duplicate URL.
        """
        return self.pool.add(role, url, stats_url)

    def launch_worker(self, role: WorkerRole) -> Worker:
        """Has the launcher spawn a worker, registered STARTING (before start, or from the
        router's event loop). Before start the caller waits for it and calls
        ``pool.started``; from the admin API the router does.

        Raises:
            RuntimeError: the router has no launcher; whatever the launcher raises.
        """
        if self._launcher is None:
            raise RuntimeError("this router has no launcher")
        return self.pool.launch(role, self._launcher)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        timeout = httpx.Timeout(self.config.request_timeout_s)
        # Idle connections expire well before the workers' keep-alive timeout (uvicorn's and
        # vLLM's default: 5 s), so the router seldom sends on one the worker is closing.
        transport = AiohttpTransport(keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
            self._client = client
            self._forwarder = Forwarder(
                self.pool, self.stats, client, self._prompt_hashes, self._published, self._clock, self.admission
            )
            self._spawn(self._probe_forever(client))
            try:
                yield
            finally:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._forwarder.close()  # the handoff releases still in flight

    def _spawn(self, coroutine) -> asyncio.Task:
        """A background task the router keeps (and cancels at shut-down)."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _probe_forever(self, client: httpx.AsyncClient) -> None:
        timeout = min(HEALTH_PROBE_TIMEOUT_S, self.config.health_interval_s)
        verdicts = ProbeVerdicts(self.pool, clock=self._clock)
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            workers = [w for w in self.pool.all() if w.state in PROBED_STATES and not verdicts.process_ended(w)]
            answers = await asyncio.gather(*(check_health(client, w, timeout) for w in workers))
            for worker, health in zip(workers, answers):
                verdicts.apply(worker, health)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}", "body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
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
            raise RequestError(
                401,
                "admin routes need 'Authorization: Bearer <admin_token>'",
                "unauthorized",
                type_="authentication_error",
            )

    def _worker(self, worker_id: str) -> Worker:
        try:
            return self.pool.get(worker_id)
        except KeyError:
            raise RequestError(404, f"no worker {worker_id!r}", "worker_not_found") from None

    async def _add(self, request: Request) -> Response:
        self._check_admin(request)
        try:
            spec = await request.json()
            role = WorkerRole(spec["role"])
            unknown = set(spec) - {"role", "url", "stats_url"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            if "url" in spec:
                worker = self.pool.add(role, spec["url"], spec.get("stats_url"))
                return JSONResponse(worker.as_json(), status_code=201)
            if "stats_url" in spec:
                raise ValueError("stats_url without url")
        except (ValueError, KeyError, TypeError) as error:
            raise RequestError(400, f"{ADD_USAGE} ({error})", "invalid_worker") from None
        return self._launch(role)

    def _launch(self, role: WorkerRole) -> Response:
        if self._launcher is None:
            raise RequestError(
                400,
                "this router cannot launch workers (it was not started by the "
                'serve command); add a running one with "url"',
                "no_launcher",
            )
        try:
            worker = self.launch_worker(role)
        except (OSError, RuntimeError, ValueError) as error:
            raise RequestError(
                500, f"could not launch a {role.value} worker: {error}", "launch_failed", type_="server_error"
            ) from None
        self._spawn(self._await_start(worker))
        return JSONResponse(worker.as_json(), status_code=202)

    async def _await_start(self, worker: Worker) -> None:
        """Puts a launched worker into rotation once healthy, or records why it failed."""
        assert worker.process is not None
        while worker.state is WorkerState.STARTING:
            try:
                if await asyncio.to_thread(worker.process.poll_start):
                    self.pool.started(worker)
                    return
            except RuntimeError as error:
                self.pool.failed(worker, str(error))
                return
            await asyncio.sleep(START_POLL_S)

    async def _drain(self, request: Request) -> Response:
        self._check_admin(request)
        worker = self._worker(request.path_params["worker_id"])
        self.pool.drain(worker.id)
        retire = self._retiring.get(worker.id)
        if retire is None:
            retire = self._retiring[worker.id] = self._spawn(self._retire(worker))
        await asyncio.wait({retire}, timeout=self.config.request_timeout_s)
        return JSONResponse(worker.as_json(), status_code=200 if retire.done() else 202)

    async def _retire(self, worker: Worker) -> None:
        """Waits until a draining worker has nothing in flight, then stops its process if
        the router launched it."""
        while worker.state is WorkerState.DRAINING:
            await asyncio.sleep(DRAIN_POLL_S)
        if worker.state is WorkerState.DRAINED and worker.process is not None:
            await asyncio.to_thread(worker.process.stop)
            self.pool.stopped(worker)

    async def _remove(self, request: Request) -> Response:
        self._check_admin(request)
        worker = self._worker(request.path_params["worker_id"])
        try:
            self.pool.remove(worker.id)
        except ValueError as error:
            raise RequestError(409, str(error), "worker_not_drained") from None
        self._retiring.pop(worker.id, None)
        return JSONResponse(worker.as_json())

    async def _worker_stats(self, workers: list[Worker], path: str) -> dict[str, WorkerReply]:
        assert self._client is not None, "the app's lifespan did not run"
        return await fetch_worker_stats(self._client, workers, path, WORKER_STATS_TIMEOUT_S)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="kvbm router", lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(RequestError, lambda _request, error: error_response(error))

        @app.post(Endpoint.COMPLETIONS.value)
        async def completions(request: Request) -> Response:
            return await self._completion(request, Endpoint.COMPLETIONS)

        @app.post(Endpoint.CHAT.value)
        async def chat(request: Request) -> Response:
            return await self._completion(request, Endpoint.CHAT)

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse(
                {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "owned_by": "kvbm"}]}
            )

        @app.get("/health")
        async def health() -> Response:
            up = len(self.pool.candidates(list(WorkerRole)))
            return JSONResponse({"status": "ok", "workers_up": up})

        @app.get("/stats")
        async def stats() -> Response:
            workers = self.pool.all()
            block_stats = await self._worker_stats(workers, "/stats")
            return JSONResponse(self.stats.as_json(workers, block_stats))

        @app.get("/metrics")
        async def metrics() -> Response:
            workers = self.pool.all()
            worker_metrics = await self._worker_stats(workers, "/metrics")
            return PlainTextResponse(
                self.stats.prometheus(workers, worker_metrics), media_type="text/plain; version=0.0.4"
            )

        @app.get("/admin/workers")
        async def list_workers(request: Request) -> Response:
            self._check_admin(request)
            return JSONResponse([w.as_json() for w in self.pool.all()])

        app.add_api_route("/admin/workers", self._add, methods=["POST"])
        app.add_api_route("/admin/workers/{worker_id}/drain", self._drain, methods=["POST"])
        app.add_api_route("/admin/workers/{worker_id}", self._remove, methods=["DELETE"])
        return app


# Longer than clients keep idle connections (httpx: 5 s, the same as uvicorn's default), so a
# client never sends a request on a connection the router is closing: under load that request
# got no answer (a read error in the client) instead of being served.
KEEP_ALIVE_S = 65


BACKLOG = 2048  # uvicorn's default


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
        try:
            self._socket.bind((config.host, config.port))
        except OSError as error:
            self._socket.close()
            raise OSError(
                error.errno, f"cannot bind the router to {config.host}:{config.port}: {error.strerror}"
            ) from None
        # Listening from here on: a client told the address (``kvbm router`` prints it before
        # uvicorn starts) waits in the backlog instead of being refused.
        self._socket.listen(BACKLOG)
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(
                router.app,
                log_level="warning",
                lifespan="on",
                access_log=False,
                timeout_keep_alive=KEEP_ALIVE_S,
                timeout_graceful_shutdown=max(1, int(config.request_timeout_s)),
            )
        )
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

    def request_stop(self) -> None:
        """Asks uvicorn to exit (safe from a signal handler); :meth:`serve_forever` returns."""
        self._server.should_exit = True

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
