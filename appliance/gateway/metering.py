"""Knowledge-base work counted against quotas: the tokens the embedder reads for a request
(the chunks of an upload, a query, the question of a chat over knowledge bases), counted 1:1
with the model's tokens, and the quota check of the knowledge-base routes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from typing import Annotated

from fastapi import Depends, Request

from appliance.gateway.auth import authenticated
from appliance.gateway.usage import quota_error
from appliance.rag.embeddings import Embedder
from appliance.security.api_keys import Principal
from appliance.security.quotas import QuotaExceeded


class Meter:
    """Tokens embedded for one request (the threads it runs its work in add to it too)."""

    def __init__(self) -> None:
        self.tokens = 0
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self.tokens += tokens


# The meter of the request being served; the embedder finds it here, in the request's threads
# too (asyncio.to_thread runs them in a copy of the request's context).
_current: ContextVar[Meter | None] = ContextVar("embedding_meter", default=None)


@contextlib.contextmanager
def metering() -> Iterator[Meter]:
    """Count what is embedded inside the block, and in the threads it starts."""
    meter = Meter()
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)


class MeteredEmbedder(Embedder):
    """An embedder that adds the tokens it reads (truncated to the model's window, as it
    embeds them) to the meter of the request it works for."""

    def embed_batches(self, texts: Sequence[str]):
        meter = _current.get()
        for start, vectors in super().embed_batches(texts):
            if meter is not None:
                meter.add(self.count_tokens(texts[start : start + len(vectors)]))
            yield start, vectors

    def count_tokens(self, texts: Sequence[str]) -> int:
        features = self._model.tokenize(list(texts))
        return int(features["attention_mask"].sum())


async def knowledge_quota(
    request: Request, who: Annotated[Principal, Depends(authenticated)]
) -> AsyncIterator[None]:
    """Dependency of the knowledge-base routes: the request counts against its user's and key's
    quotas (HTTP 429 over them), and the tokens it embeds against their tokens per day."""
    quotas = request.app.state.gateway.quotas
    try:
        ticket = quotas.admit(who.user, who.key_id, False)
    except QuotaExceeded as exc:
        raise quota_error(exc) from None
    meter = Meter()
    # Not reset: FastAPI may leave this dependency in another context; this one ends with the
    # request.
    _current.set(meter)
    try:
        yield
    finally:
        quotas.done(ticket, meter.tokens)
