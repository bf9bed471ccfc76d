"""Replays a workload against an OpenAI completions endpoint and times every token.

Every request streams (``stream: true``) with ``return_token_ids`` so each event says how
many tokens it carries: TTFT is request sent -> first event with a token, and an event that
carries k tokens (vLLM merges tokens when the client reads late) counts as k inter-token
gaps of equal length. Greedy decoding with ``ignore_eos`` makes every request produce
exactly ``max_tokens`` tokens, which :func:`run_load` checks.

Sessions run as coroutines; a semaphore keeps at most ``concurrency`` requests in flight,
so turns of different conversations interleave the way concurrent users' turns would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import numpy as np

from bench.workloads import Request, Workload
from kvbm.serving.aiohttp_transport import AiohttpTransport
from kvbm.serving.sse import DONE, aiter_data


class LoadError(RuntimeError):
    """A request failed; the message names it and what the server said."""


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    gaps_s: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What one workload measured on one setup."""

    workload: str
    concurrency: int
    wall_s: float
    timings: tuple[RequestTiming, ...]
    skipped: int = 0  # requests not sent because the time budget ran out

    def summary(self) -> dict[str, float | int]:
        ttft = np.array([t.ttft_s for t in self.timings])
        gaps = np.array([g for t in self.timings for g in t.gaps_s])
        out_tokens = sum(t.output_tokens for t in self.timings)
        return {
            "requests": len(self.timings),
            "prompt_tokens": sum(t.prompt_tokens for t in self.timings),
            "output_tokens": out_tokens,
            "wall_s": self.wall_s,
            "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3,
            "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3,
            "itl_p50_ms": float(np.percentile(gaps, 50)) * 1e3 if gaps.size else float("nan"),
            "itl_p99_ms": float(np.percentile(gaps, 99)) * 1e3 if gaps.size else float("nan"),
            "output_tok_s": out_tokens / self.wall_s,
            "skipped": self.skipped,
        }


def run_load(
    url: str, model: str, workload: Workload, concurrency: int, timeout_s: float, budget_s: float | None = None
) -> LoadResult:
    """Runs every session of ``workload`` against ``url`` (``/v1/completions``); ``timeout_s``
    bounds each request's wait for its next bytes. Once ``budget_s`` has passed no new request
    starts (those in flight finish); the result counts the ones skipped.

    Raises:
        LoadError: a request failed or produced fewer tokens than asked.
    """
    return asyncio.run(_run(url, model, workload, concurrency, timeout_s, budget_s))


async def _run(
    url: str, model: str, workload: Workload, concurrency: int, timeout_s: float, budget_s: float | None
) -> LoadResult:
    slots = asyncio.Semaphore(concurrency)
    skipped = 0
    # The router's transport: httpcore's own pool costs the load generator a core at 64 streams
    # (it scans every pooled connection for each request), time the servers measured should have.
    transport = AiohttpTransport(keepalive_expiry=5.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), transport=transport) as client:

        async def session(requests: tuple[Request, ...]) -> list[RequestTiming]:
            nonlocal skipped
            timings = []
            for n, request in enumerate(requests):
                async with slots:
                    if budget_s is not None and time.perf_counter() - start > budget_s:
                        skipped += len(requests) - n
                        break
                    timings.append(await _one(client, url, model, request))
            return timings

        start = time.perf_counter()
        done = await asyncio.gather(*(session(s) for s in workload.sessions))
        wall = time.perf_counter() - start
    return LoadResult(workload.name, concurrency, wall, tuple(t for timings in done for t in timings), skipped)


async def _one(client: httpx.AsyncClient, url: str, model: str, request: Request) -> RequestTiming:
    body = {
        "model": model,
        "prompt": list(request.prompt),
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    first: float | None = None
    last = 0.0
    gaps: list[float] = []
    tokens = 0
    start = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            text = (await reply.aread()).decode(errors="replace")
            raise LoadError(
                f"{request.kind} request ({len(request.prompt)} prompt tokens) got "
                f"HTTP {reply.status_code}: {text[:500]}"
            )
        async for data in aiter_data(reply):
            if data == DONE:
                continue
            event = json.loads(data)
            if "error" in event:
                raise LoadError(f"{request.kind} request failed mid-stream: {event['error']}")
            count = sum(len(c.get("token_ids") or ()) for c in event.get("choices", ()))
            if not count:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.extend([(now - last) / count] * count)
            last = now
            tokens += count
    if first is None or tokens != request.max_tokens:
        raise LoadError(f"{request.kind} request streamed {tokens} tokens, asked for {request.max_tokens}")
    return RequestTiming(len(request.prompt), tokens, first - start, tuple(gaps))
