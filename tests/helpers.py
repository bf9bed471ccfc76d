"""Helpers several test modules share: a clock the test moves, and OpenAI request bodies and
replies for the router and serve tests."""

from __future__ import annotations

import json

import httpx

from kvbm.serving.sse import DONE, data_of

MODEL = "tiny"
MAX_TOKENS = 12
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MESSAGES = [{"role": "user", "content": "Tell me about hash-addressed block managers."}]


class FakeClock:
    """Monotonic seconds that move only when the test sets ``now``."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def completion_body(prompt: str, stream: bool = False, max_tokens: int = MAX_TOKENS) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def chat_body(stream: bool = False) -> dict:
    return {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def text_of(reply: httpx.Response) -> str:
    """The generated text of a completion or chat reply, streamed (SSE) or not."""
    assert reply.status_code == 200, reply.text
    if not reply.headers["content-type"].startswith("text/event-stream"):
        choice = reply.json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    parts = []
    for data in data_of(reply.content):
        if data == DONE:
            continue
        event = json.loads(data)
        assert "error" not in event, event
        for choice in event["choices"]:
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    assert reply.text.rstrip().endswith("data: [DONE]")
    return "".join(parts)
