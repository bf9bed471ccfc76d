"""Checks a client's request body before any worker sees it.

Contract: :func:`parse_request` returns the body as a dict, or raises :class:`RequestError`
carrying the HTTP status and an OpenAI-style error naming the problem. Only the fields the
router relies on are checked (model, stream, max_tokens, prompt/messages); the worker
validates the rest and its 4xx replies pass through unchanged.
"""

from __future__ import annotations

import enum
import json

from kvbm.serving.router_config import RouterConfig


class Endpoint(enum.Enum):
    """The OpenAI routes the router forwards."""

    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


class RequestError(Exception):
    """A request the router refuses; ``as_json`` is the OpenAI error body."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_

    def as_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(prompt: object) -> None:
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list)
        and prompt
        and (
            all(isinstance(p, str) for p in prompt)
            or all(_is_int(t) and t >= 0 for t in prompt)
            or all(isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p) for p in prompt)
        )
    )
    if not ok:
        raise RequestError(
            400,
            "'prompt' must be a string, a non-empty list of strings, a list of token ids, or a list of token-id lists",
            "invalid_type",
            "prompt",
        )


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "invalid_type", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(
                400, f"'messages[{i}]' must be an object with a string 'role'", "invalid_type", f"messages[{i}]"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(
                400,
                f"'messages[{i}].content' must be a string, a list or null",
                "invalid_type",
                f"messages[{i}].content",
            )


def parse_request(raw: bytes, endpoint: Endpoint, config: RouterConfig) -> dict:
    """Decodes and checks one request body.

    Raises:
        RequestError: 413 when larger than ``config.max_body_bytes``; 400 for invalid
            UTF-8, malformed JSON, a non-object, a missing or mistyped field, or max_tokens
            outside [1, ``config.max_tokens_cap``]; 404 for a model the router does not serve.
    """
    if len(raw) > config.max_body_bytes:
        raise RequestError(
            413, f"request body is {len(raw)} bytes; the limit is {config.max_body_bytes}", "body_too_large"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(
            400, f"request body is not valid UTF-8 ({error.reason} at byte {error.start})", "invalid_utf8"
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(
            400,
            f"request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
            "invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_type")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "'model' is required and must be a string", "invalid_type", "model")
    if model != config.model_name:
        raise RequestError(
            404, f"model {model!r} does not exist; this router serves {config.model_name!r}", "model_not_found", "model"
        )
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError(400, "'stream' must be a boolean", "invalid_type", "stream")
    for field in ("max_tokens", "max_completion_tokens"):
        if body.get(field) is None:
            continue
        value = body[field]
        if not _is_int(value):
            raise RequestError(400, f"'{field}' must be an integer", "invalid_type", field)
        if not 1 <= value <= config.max_tokens_cap:
            raise RequestError(
                400, f"'{field}' must be in [1, {config.max_tokens_cap}], got {value}", "invalid_value", field
            )
    if endpoint is Endpoint.COMPLETIONS:
        if "prompt" not in body:
            raise RequestError(400, "'prompt' is required", "missing_field", "prompt")
        _check_prompt(body["prompt"])
    else:
        if "messages" not in body:
            raise RequestError(400, "'messages' is required", "missing_field", "messages")
        _check_messages(body["messages"])
    return body
