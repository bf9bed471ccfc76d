"""kvbm's command line: ``python -m kvbm.serving <command>`` (or ``kvbm <command>``).

Commands:
    demo    start a vLLM OpenAI server on the embedded model, send one completion, print it, stop
    model   build (once) the embedded model and print its directory
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kvbm.serving.embedded_model import PRESETS, ensure_model
from kvbm.serving.server_process import ServerStartError, VLLMServer
from kvbm.serving.vllm_settings import EngineSettings

DEFAULT_PROMPT = "The block manager keeps every KV block in the fastest tier that has room, and"


def _complete(base_url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(base_url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def run_demo(args: argparse.Namespace) -> int:
    model_dir = ensure_model(args.preset)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="kvbm-demo-"))
    settings = EngineSettings(model=model_dir)
    print(f"model: {model_dir}")
    print(f"starting vLLM server (log: {log_dir / 'server.log'}) ...", flush=True)
    started = time.monotonic()
    try:
        with VLLMServer(settings, log_dir / "server.log", served_name=args.preset) as server:
            print(f"healthy at {server.url} after {time.monotonic() - started:.1f} s", flush=True)
            sent = time.monotonic()
            reply = _complete(server.url, args.preset, args.prompt, args.max_tokens)
            elapsed = time.monotonic() - sent
    except ServerStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    usage = reply.get("usage", {})
    print(f"prompt: {args.prompt!r}")
    print(f"completion: {reply['choices'][0]['text']!r}")
    print(f"tokens: {usage.get('prompt_tokens')} prompt, {usage.get('completion_tokens')} "
          f"completion, {elapsed * 1000:.0f} ms")
    print("server stopped")
    return 0


def run_model(args: argparse.Namespace) -> int:
    print(ensure_model(args.preset))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvbm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="one server, one completion, on the embedded model")
    demo.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--log-dir", default=None, help="server logs (default: a new temp dir)")
    demo.set_defaults(run=run_demo)

    model = commands.add_parser("model", help="build the embedded model, print its directory")
    model.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    model.set_defaults(run=run_model)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
