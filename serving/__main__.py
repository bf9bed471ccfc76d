"""kvbm's command line: ``python -m kvbm.serving <command>`` (or ``kvbm <command>``).

Commands:
    serve   N prefill + M decode vLLM servers with kvbm's connector behind kvbm's router,
            until Ctrl-C or SIGTERM
    demo    the same stack (1 prefill + 1 decode on the embedded model by default): a few
            completions, their TTFT and every worker's block stats, then a clean stop;
            ``--prefill 0`` serves them aggregated
    router  kvbm's router alone, over vLLM servers already running (``--worker ROLE=URL``),
            until Ctrl-C or SIGTERM; restarting it restarts no worker
    model   build (once) the embedded model and print its directory
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvbm.serving.embedded_model import PRESETS, ensure_model
from kvbm.serving.router import Router, RouterServer
from kvbm.serving.router_config import RouterConfig
from kvbm.serving.serve import ServeOptions, ServeStack, describe, serve_until_signal, signals_interrupt
from kvbm.serving.server_process import ServerStartError
from kvbm.serving.sse import DONE, iter_data
from kvbm.serving.vllm_settings import EngineSettings
from kvbm.serving.workers import WorkerRole

# Two prompts share this prefix (several KV blocks), so the second reuses its blocks.
SHARED_PREFIX = (
    "kvbm names every KV block by the chained hash of its tokens, so two requests that share a "
    "prefix share its blocks. A prefill worker computes the prompt, keeps its blocks under a "
    "lease and offloads them to host memory; the decode worker pulls the blocks it lacks over "
    "NIXL straight into its own cache, verifies their checksums and releases the lease. A block "
    "that fails its check is never handed to the engine: it is recomputed. "
)
DEMO_REQUESTS = (  # (prompt, stream)
    (SHARED_PREFIX + "Question: what does the prefill worker hand to the decode worker?\nAnswer:", False),
    (SHARED_PREFIX + "Question: what happens to a block that fails its checksum?\nAnswer:", False),
    ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', True),
)


def _model_arg(value: str) -> str:
    if value in PRESETS or (Path(value) / "config.json").is_file():
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a model directory"
    )


def _count(minimum: int):
    def parse(value: str) -> int:
        if not value.isdigit() or int(value) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return int(value)

    return parse


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _options(args: argparse.Namespace, router: dict) -> ServeOptions:
    """The stack the parsed flags describe (builds the embedded model when it is named)."""
    if args.model in PRESETS:
        model, served_name = ensure_model(args.model), args.model
    else:
        model = Path(args.model).resolve()
        served_name = model.name
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix=f"kvbm-{args.command}-"))
    engine = EngineSettings(model=model, dtype=args.dtype, chat_template=args.chat_template)
    return ServeOptions(
        engine=engine,
        router=RouterConfig(model_name=served_name, **router),
        log_dir=log_dir,
        prefill=args.prefill,
        decode=args.decode,
        kvbm=args.kvbm_config,
        g3_dir=args.g3_dir,
    )


def router_fields(args: argparse.Namespace) -> dict:
    """The :class:`RouterConfig` fields the serve command's flags set."""
    return {
        "host": args.host,
        "port": args.port,
        "admin_token": args.admin_token,
        "queue_size": args.queue_size,
        "queue_timeout_s": args.queue_timeout_s,
    }


def run_serve(args: argparse.Namespace) -> int:
    try:
        options = _options(args, router_fields(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve_until_signal(options)


def _worker_arg(value: str) -> tuple[WorkerRole, str, str | None]:
    """``ROLE=URL[,STATS_URL]`` -> (role, url, stats url)."""
    role, _, rest = value.partition("=")
    url, _, stats_url = rest.partition(",")
    roles = ", ".join(r.value for r in WorkerRole)
    if role not in {r.value for r in WorkerRole} or not url:
        raise argparse.ArgumentTypeError(f"expected ROLE=URL[,STATS_URL] with ROLE one of {roles}, got {value!r}")
    return WorkerRole(role), url, stats_url or None


def run_router(args: argparse.Namespace) -> int:
    """Serves a router over the given workers until SIGINT/SIGTERM (uvicorn's handlers)."""
    try:
        router = Router(
            RouterConfig(
                model_name=args.model_name,
                request_timeout_s=args.request_timeout_s,
                health_interval_s=args.health_interval_s,
                **router_fields(args),
            )
        )
        for role, url, stats_url in args.worker:
            router.add_worker(role, url, stats_url)
        server = RouterServer(router)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    print(
        f"router {server.url} serving model {args.model_name!r}; workers:",
        *(f"  {role.value} {url}" for role, url, _ in args.worker),
        "ready (Ctrl-C or SIGTERM stops)",
        sep="\n",
        flush=True,
    )
    # uvicorn handles SIGINT/SIGTERM while it serves, then raises the signal again to the
    # handler it found: this one, so the process ends with "stopped" and 0, not killed.
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, lambda signum, frame: server.request_stop())
    server.serve_forever()
    print("stopped", flush=True)
    return 0


def _complete(client: httpx.Client, model: str, prompt: str, stream: bool, max_tokens: int) -> tuple[str, float, int]:
    """(completion, seconds to the first token, completion tokens). Without streaming the
    first token arrives with the whole reply."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    sent = time.monotonic()
    if not stream:
        reply = client.post("/v1/completions", json=body)
        reply.raise_for_status()
        answer = reply.json()
        return answer["choices"][0]["text"], time.monotonic() - sent, answer["usage"]["completion_tokens"]
    parts: list[str] = []
    first, tokens = None, 0
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        for data in iter_data(reply.iter_bytes()):
            if data == DONE:
                continue
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']['message']}")
            if event["choices"] and first is None:
                first = time.monotonic() - sent
            parts += [choice["text"] for choice in event["choices"]]
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    return "".join(parts), first or 0.0, tokens


def _block_stats_line(worker: dict) -> str:
    """One worker's G2 hits and blocks and the blocks it pulled from peers."""
    stats = worker.get("block_stats") or {"error": "no stats endpoint"}
    if "error" in stats:
        return f"  {worker['id']} {worker['role']}: stats unavailable ({stats['error']})"
    g2 = stats.get("tiers", {}).get("g2", {})
    pulled = stats.get("remote", {}).get("pulls", {}).get("blocks_pulled", "n/a")
    return (
        f"  {worker['id']} {worker['role']}: G2 hits {g2.get('hits', 0)} of "
        f"{g2.get('hits', 0) + g2.get('misses', 0)} looked-up blocks, G2 holds "
        f"{g2.get('used_blocks', 0)} blocks, remote blocks pulled {pulled}"
    )


def _demo_requests(stack: ServeStack, max_tokens: int) -> dict:
    """Sends the demo's requests one after another, prints each; returns the router's /stats."""
    model = stack.options.router.model_name
    with httpx.Client(base_url=stack.url, timeout=300) as client:
        for number, (prompt, stream) in enumerate(DEMO_REQUESTS, 1):
            text, ttft, tokens = _complete(client, model, prompt, stream, max_tokens)
            how = "streamed" if stream else "not streamed: the whole reply"
            shared = " (shares a long prefix with another request)" if prompt.startswith(SHARED_PREFIX) else ""
            print(f"[{number}] prompt: {len(prompt)} characters{shared}")
            print(f"[{number}] completion: {text!r}")
            print(f"[{number}] ttft: {ttft * 1000:.0f} ms ({how}), {tokens} tokens", flush=True)
        return client.get("/stats").json()


def run_demo(args: argparse.Namespace) -> int:
    try:
        options = _options(args, {})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model: {options.engine.model}")
    print(
        f"starting {options.prefill} prefill + {options.decode} "
        f"{'decode' if options.prefill else 'aggregated'} workers and the router "
        f"(logs: {options.log_dir}) ...",
        flush=True,
    )
    started = time.monotonic()
    with signals_interrupt() as interrupted:
        try:
            with ServeStack(options).start(interrupted) as stack:
                print(
                    f"ready at {stack.url} after {time.monotonic() - started:.1f} s:",
                    *describe(stack),
                    sep="\n",
                    flush=True,
                )
                stats = _demo_requests(stack, args.max_tokens)
                print("stopping ...", flush=True)
        except (ServerStartError, OSError, httpx.HTTPError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; stopped", file=sys.stderr)
            return 130
    print("block stats (per worker, from the router's /stats):")
    print(*(_block_stats_line(worker) for worker in stats["workers"]), sep="\n")
    print(
        f"router: {stats['requests']} requests, {stats['disaggregated']} prefilled on another "
        f"worker, TTFT p50 {stats['ttft_s']['p50'] * 1000:.0f} ms"
    )
    print("stopped")
    return 0


def run_model(args: argparse.Namespace) -> int:
    print(ensure_model(args.preset))
    return 0


def _stack_flags(parser: argparse.ArgumentParser, dtype: str) -> None:
    parser.add_argument(
        "--model", default="tiny", type=_model_arg, help="an embedded model preset or a model directory (default: tiny)"
    )
    parser.add_argument(
        "--prefill", type=_count(0), default=1, help="prefill workers; 0 serves aggregated (default: 1)"
    )
    parser.add_argument("--decode", type=_count(1), default=1, help="decode workers (default: 1)")
    parser.add_argument("--dtype", default=dtype, help=f"weights and KV dtype (default: {dtype})")
    parser.add_argument(
        "--chat-template", type=Path, default=None, help="Jinja chat template file for models without one"
    )
    parser.add_argument("--log-dir", default=None, help="worker logs (default: a new temp dir)")
    parser.add_argument(
        "--kvbm-config",
        type=_json_object,
        default={},
        metavar="JSON",
        help='kv_connector_extra_config fields for every worker, e.g. \'{"g2_capacity_bytes": "4GiB"}\'',
    )
    parser.add_argument(
        "--g3-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="a G3 disk tier per worker in DIR/<worker id> (2 GiB each unless "
        "--kvbm-config sets g3_capacity_bytes); a restart on DIR comes back warm",
    )


def _router_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="router address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="router port (default: 8000)")
    parser.add_argument("--admin-token", default=None, help="bearer token for /admin routes (required off loopback)")
    defaults = RouterConfig(model_name="any")  # the defaults the flags show
    parser.add_argument(
        "--queue-size",
        type=_count(0),
        default=defaults.queue_size,
        help="requests that may wait for a worker when none can take them; one "
        f"more gets a 503 at once; 0: no waiting (default: {defaults.queue_size})",
    )
    parser.add_argument(
        "--queue-timeout-s",
        type=_seconds,
        default=defaults.queue_timeout_s,
        metavar="SECONDS",
        help=f"longest a request waits for a worker before its 503 (default: {defaults.queue_timeout_s:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per command; ``args.run(args)`` runs it."""
    parser = argparse.ArgumentParser(
        prog="kvbm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="prefill + decode workers behind a router")
    _stack_flags(serve, dtype="bfloat16")
    _router_flags(serve)
    serve.set_defaults(run=run_serve)

    router = commands.add_parser("router", help="the router alone, over running vLLM servers")
    router.add_argument("--model-name", required=True, help="the model name the workers serve")
    router.add_argument(
        "--worker",
        type=_worker_arg,
        action="append",
        default=[],
        metavar="ROLE=URL[,STATS_URL]",
        help="a running worker (repeat): ROLE prefill, decode or aggregated; STATS_URL its kvbm stats endpoint",
    )
    _router_flags(router)
    defaults = RouterConfig(model_name="any")
    router.add_argument(
        "--request-timeout-s",
        type=_seconds,
        default=defaults.request_timeout_s,
        metavar="SECONDS",
        help=f"limit on one worker exchange (default: {defaults.request_timeout_s:g})",
    )
    router.add_argument(
        "--health-interval-s",
        type=_seconds,
        default=defaults.health_interval_s,
        metavar="SECONDS",
        help=f"health probe period (default: {defaults.health_interval_s:g})",
    )
    router.set_defaults(run=run_router)

    demo = commands.add_parser("demo", help="the serve stack answers a few completions, then stops")
    _stack_flags(demo, dtype="float32")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(run=run_demo)

    model = commands.add_parser("model", help="build the embedded model, print its directory")
    model.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    model.set_defaults(run=run_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
