"""Hybrid retrieval: vector and BM25 keyword rankings fused by reciprocal rank, then reranked.

Both rankings come from the store: Chroma's nearest neighbours, and its keyword index (SQLite
FTS5, kept up to date document by document; see appliance/rag/keywords.py).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from appliance.rag.access import Principal
from appliance.rag.chunking import Chunk
from appliance.rag.registry import KnowledgeBase
from appliance.rag.reranking import Reranker
from appliance.rag.store import KnowledgeBaseStore


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk with its score (higher is better) and the retrievers that found it."""

    chunk: Chunk
    score: float
    """Reciprocal rank fusion score, or the reranker's score when one is configured."""
    ranks: Mapping[str, int]
    """1-based rank of the chunk in each retriever that found it: "vector", "keyword"."""


def reciprocal_rank_fusion(rankings: Mapping[str, Sequence[Chunk]], k: int) -> list[Hit]:
    """Hits scored by the sum of 1 / (k + rank) over the rankings, best first.

    Ranks, not scores, are combined: cosine similarity and BM25 scores have unrelated scales.
    """
    scores: dict[tuple[str, str], float] = defaultdict(float)
    ranks: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    chunks: dict[tuple[str, str], Chunk] = {}
    for retriever, ranking in rankings.items():
        for rank, chunk in enumerate(ranking, start=1):
            key = (chunk.kb, chunk.id)
            chunks[key] = chunk
            scores[key] += 1 / (k + rank)
            ranks[key][retriever] = rank
    order = sorted(scores, key=scores.__getitem__, reverse=True)
    return [Hit(chunks[key], scores[key], ranks[key]) for key in order]


class Retriever:
    """Finds the chunks of a store's knowledge bases that best match a query."""

    def __init__(self, store: KnowledgeBaseStore, reranker: Reranker | None = None) -> None:
        self._store = store
        self._settings = store.settings
        self._reranker = reranker

    @classmethod
    def from_settings(cls, store: KnowledgeBaseStore) -> Retriever:
        """A retriever with the reranker of the store's settings, if any."""
        return cls(store, Reranker.from_settings(store.settings))

    def retrieve(
        self,
        principal: Principal,
        kb_names: Iterable[str],
        query: str,
        top_k: int | None = None,
        *,
        vector_only: bool = False,
    ) -> list[Hit]:
        """The best `top_k` chunks (default: rag.top_k) of the knowledge bases for the query.

        `vector_only` leaves out the keyword ranking, to measure what it adds. Raises
        KnowledgeBaseNotFound for a knowledge base the principal may not read.
        """
        settings = self._settings
        top_k = top_k or settings.top_k
        depth = max(settings.candidates, top_k)
        # By id: a name and an id may stand for the same knowledge base.
        found = (self._store.get(principal, ref) for ref in kb_names)
        kbs = list({kb.id: kb for kb in found}.values())
        vector = self._store.embedder.embed([query])[0]
        rankings = {"vector": self._vector_ranking(principal, kbs, vector, depth)}
        if not vector_only:
            rankings["keyword"] = self._keyword_ranking(principal, kbs, query, depth)
        hits = reciprocal_rank_fusion(rankings, settings.rrf_k)[:depth]
        if self._reranker is not None:
            scores = self._reranker.scores(query, [hit.chunk.text for hit in hits])
            reranked = [replace(hit, score=score) for hit, score in zip(hits, scores, strict=True)]
            hits = sorted(reranked, key=lambda hit: hit.score, reverse=True)
        return hits[:top_k]

    def _vector_ranking(
        self, principal: Principal, kbs: list[KnowledgeBase], vector: Sequence[float], n: int
    ) -> list[Chunk]:
        # Similarities of one model compare across knowledge bases: merge them by value.
        found = [pair for kb in kbs for pair in self._store.search(principal, kb.id, vector, n)]
        return [chunk for chunk, _ in heapq.nlargest(n, found, key=lambda pair: pair[1])]

    def _keyword_ranking(
        self, principal: Principal, kbs: list[KnowledgeBase], query: str, n: int
    ) -> list[Chunk]:
        # BM25 scores of different knowledge bases use different term statistics, but are of
        # the same scale; merging them by value is close enough for a candidate list.
        found = [
            pair for kb in kbs for pair in self._store.keyword_search(principal, kb.id, query, n)
        ]
        return [chunk for chunk, _ in heapq.nlargest(n, found, key=lambda pair: pair[1])]
