"""The router's view of the KV blocks each prefill worker holds, for KV-aware routing.

Two halves, matching the router's hooks (:data:`~kvbm.serving.forwarding.PromptHashes` and
:data:`~kvbm.serving.routing.PublishedHashes`):

- ``prompt_hashes(body)``: tokenizes the request with the model's own tokenizer (and chat
  template) and hashes its full blocks exactly as the workers do, from the layout fingerprint
  a worker serves on its stats endpoint (``/layout``).
- ``published(worker_id)``: the hashes a worker announced on ``/published``, kept current by
  :meth:`KvIndex.refresh` (a snapshot first, then deltas since the version held), which the
  serve command calls every ``REFRESH_INTERVAL_S`` from a thread of its own.

Routing is a heuristic, never a correctness matter: a tokenizer that disagrees with vLLM, a
worker that does not answer, or a stale view only make the choice fall back to load.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kvbm.hashing import BlockExtras, BlockHasher, LayoutFingerprint
from kvbm.ids import BlockHash
from kvbm.remote.publication import PublishedView

logger = logging.getLogger(__name__)

REFRESH_TIMEOUT_S = 2.0
REFRESH_INTERVAL_S = 0.5


class KvIndex:
    """Prompt hashing and published hashes per worker (see the module docstring).

    Args:
        model_dir: the served model (its tokenizer files).
        chat_template: the chat template the workers use, when the model has none.
    """

    def __init__(self, model_dir: Path, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as error:  # the workers report a broken model; routing goes by load
            logger.warning("kv index: no tokenizer in %s (%s); prefill choice goes by load only", model_dir, error)
            self._tokenizer = None
        self._chat_template = chat_template
        self._hasher: BlockHasher | None = None
        self._views: dict[str, PublishedView] = {}

    def published(self, worker_id: str) -> Collection[BlockHash]:
        return self._views.get(worker_id, ())  # the live view: no copy per request

    def prompt_hashes(self, body: dict) -> tuple[BlockHash, ...]:
        """The request's chained block hashes; empty when it cannot be hashed (yet)."""
        if self._hasher is None or self._tokenizer is None:
            return ()
        tokens = self._tokens(body)
        if tokens is None:
            return ()
        salt = body.get("cache_salt")
        extras = {0: BlockExtras(cache_salt=salt)} if isinstance(salt, str) else None
        return self._hasher.hash_prompt(np.asarray(tokens, dtype=np.int32), extras=extras).hashes

    def refresh(self, client: httpx.Client, workers: dict[str, str]) -> None:
        """One round over ``workers`` (id -> stats URL ``http://host:port``): learn the layout
        (once), bring their views up to date, forget workers no longer listed."""
        for gone in self._views.keys() - workers.keys():
            del self._views[gone]
        for worker_id, url in workers.items():
            url = url.rstrip("/")
            try:
                if self._hasher is None:
                    reply = client.get(url + "/layout", timeout=REFRESH_TIMEOUT_S)
                    reply.raise_for_status()
                    self._hasher = BlockHasher(LayoutFingerprint(**reply.json()))
                view = self._views.setdefault(worker_id, PublishedView())
                params = {} if view.version is None else {"since": view.version}
                reply = client.get(url + "/published", params=params, timeout=REFRESH_TIMEOUT_S)
                reply.raise_for_status()
                if not view.apply(reply.json()):
                    fresh = PublishedView()  # a gap in the deltas: start over from a snapshot
                    reply = client.get(url + "/published", timeout=REFRESH_TIMEOUT_S)
                    reply.raise_for_status()
                    fresh.apply(reply.json())
                    self._views[worker_id] = fresh
            except (httpx.HTTPError, ValueError, TypeError, KeyError) as error:
                logger.debug("kv index: worker %s not refreshed: %s", worker_id, error)

    def _tokens(self, body: dict) -> list[int] | None:
        try:
            if "messages" in body:
                return list(
                    self._tokenizer.apply_chat_template(
                        body["messages"], tokenize=True, add_generation_prompt=True, chat_template=self._chat_template
                    )
                )
            prompt: Any = body.get("prompt")
            if isinstance(prompt, str):
                return self._tokenizer(prompt)["input_ids"]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return prompt
        except Exception as error:  # a template or tokenizer failure only loses the routing hint
            logger.debug("kv index: cannot tokenize a request: %s", error)
        return None
