"""Fixed-seed request streams for the end-to-end benchmarks, as token ids.

Prompts are token ids, not text: every setup then sees exactly the same prompts (no
tokenizer in the way), lengths are exact, and block-aligned sharing is under our control.
Ids are drawn from ``[FIRST_ID, vocab)`` so no special token lands in a prompt.

A :class:`Workload` is a set of sessions: a session's requests run one after the other
(a chat conversation's turns), different sessions run concurrently up to the load's limit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FIRST_ID = 3  # below this: the embedded tokenizer's special tokens


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion: the prompt's token ids and how many tokens to generate."""

    prompt: tuple[int, ...]
    max_tokens: int
    kind: str


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    sessions: tuple[tuple[Request, ...], ...]

    @property
    def requests(self) -> list[Request]:
        return [r for session in self.sessions for r in session]


def _tokens(rng: np.random.Generator, vocab: int, count: int) -> tuple[int, ...]:
    return tuple(rng.integers(FIRST_ID, vocab, count).tolist())


def mixed(
    seed: int, vocab: int, count: int, long_prompt: int, short_gen: int, short_prompt: int, long_gen: int
) -> Workload:
    """Alternating long-prompt/short-generation and short-prompt/long-generation requests,
    all unique: prefills that stall an aggregated server's decodes, decodes that run long."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        if i % 2 == 0:
            requests.append(Request(_tokens(rng, vocab, long_prompt), short_gen, "long prompt"))
        else:
            requests.append(Request(_tokens(rng, vocab, short_prompt), long_gen, "long generation"))
    return Workload(
        "mixed",
        f"{count} unique requests, alternating {long_prompt}-token prompt / "
        f"{short_gen} tokens out and {short_prompt}-token prompt / {long_gen} tokens out",
        tuple((r,) for r in requests),
    )


def chat(seed: int, vocab: int, conversations: int, turns: int, system: int, user: int, reply: int) -> Workload:
    """Multi-turn conversations sharing one system prompt: turn t's prompt is the whole
    history so far (system, then user and assistant turns) plus a new user turn.

    The assistant turns in the history are fixed-seed tokens standing in for the replies,
    so the history is the same for every setup whatever the model generated."""
    rng = np.random.default_rng(seed)
    shared = _tokens(rng, vocab, system)
    sessions = []
    for _ in range(conversations):
        history, session = shared, []
        for _ in range(turns):
            history = history + _tokens(rng, vocab, user)
            session.append(Request(history, reply, "chat"))
            history = history + _tokens(rng, vocab, reply)
        sessions.append(tuple(session))
    return Workload(
        "chat",
        f"{conversations} conversations x {turns} turns: {system}-token shared "
        f"system prompt, {user}-token user turns, {reply}-token replies",
        tuple(sessions),
    )


def rag(
    seed: int,
    vocab: int,
    documents: int,
    doc_tokens: int,
    questions_per_doc: int,
    question_tokens: int,
    queries: int,
    answer: int,
) -> Workload:
    """Queries over a shared set of documents: each is one document followed by one of
    that document's questions, drawn at random (so some whole prompts repeat, as popular
    questions do, and most share only the document)."""
    rng = np.random.default_rng(seed)
    docs = [_tokens(rng, vocab, doc_tokens) for _ in range(documents)]
    questions = [[_tokens(rng, vocab, question_tokens) for _ in range(questions_per_doc)] for _ in docs]
    sessions = []
    for _ in range(queries):
        d = int(rng.integers(documents))
        q = int(rng.integers(questions_per_doc))
        sessions.append((Request(docs[d] + questions[d][q], answer, "rag"),))
    return Workload(
        "rag",
        f"{queries} queries over {documents} documents of {doc_tokens} tokens "
        f"({questions_per_doc} questions of {question_tokens} tokens each), "
        f"{answer} tokens out",
        tuple(sessions),
    )


def shared_documents(
    seed: int, vocab: int, documents: int, doc_tokens: int, question_tokens: int, queries: int, answer: int
) -> Workload:
    """Queries over a few shared documents, taken in turn: query ``i`` is document
    ``i % documents`` followed by a question of its own, so every document's blocks are
    shared by ``queries / documents`` prompts and no two prompts are equal (unlike
    :func:`rag`, whose random draws repeat some whole prompts)."""
    rng = np.random.default_rng(seed)
    docs = [_tokens(rng, vocab, doc_tokens) for _ in range(documents)]
    sessions = tuple(
        (Request(docs[i % documents] + _tokens(rng, vocab, question_tokens), answer, "document"),)
        for i in range(queries)
    )
    return Workload(
        "documents",
        f"{queries} queries over {documents} shared documents of {doc_tokens} "
        f"tokens, each plus a {question_tokens}-token question of its own, {answer} tokens out",
        sessions,
    )
