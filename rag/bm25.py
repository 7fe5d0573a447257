"""Okapi BM25 keyword ranking: finds rare exact terms (part numbers, names) that vectors blur."""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"\w+")
# Only the commonest English function words: they match almost every chunk and add noise, while
# rarer words (even short ones such as "no" or "not") can matter to a query.
_STOP_LIST = (
    "a an and are as at be by for from has have in is it its of on or that the this to was were "
    "will with"
)
STOP_WORDS = frozenset(_STOP_LIST.split())


def tokenize(text: str) -> list[str]:
    """Lowercased runs of Unicode word characters, without stop words: "XK-4471" is xk, 4471."""
    return [word for word in _WORD.findall(text.casefold()) if word not in STOP_WORDS]


class BM25:
    """Okapi BM25 over a fixed list of documents, each given as its tokens."""

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75):
        self.k1 = k1
        self.b = b
        self._lengths = [len(tokens) for tokens in documents]
        self._average_length = sum(self._lengths) / len(documents) if documents else 0.0
        # Postings: for each term, the documents that have it and how often.
        self._postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for number, tokens in enumerate(documents):
            for term, frequency in Counter(tokens).items():
                self._postings[term].append((number, frequency))
        # Lucene's idf, log(1 + (N - n + 0.5) / (n + 0.5)): like Okapi's but never negative, so
        # a term found in most documents still counts a little instead of counting against.
        total = len(documents)
        self._idf = {
            term: math.log(1 + (total - len(postings) + 0.5) / (len(postings) + 0.5))
            for term, postings in self._postings.items()
        }

    def top(self, query: Iterable[str], n: int) -> list[tuple[int, float]]:
        """The `n` best (document number, score) pairs for the query tokens, best first; only
        documents with at least one query term."""
        scores: dict[int, float] = defaultdict(float)
        for term in set(query):  # a word repeated in a short query is no stronger a signal
            idf = self._idf.get(term)
            if idf is None:
                continue
            for number, frequency in self._postings[term]:
                length_norm = 1 - self.b + self.b * self._lengths[number] / self._average_length
                saturation = frequency + self.k1 * length_norm
                scores[number] += idf * frequency * (self.k1 + 1) / saturation
        return heapq.nlargest(n, scores.items(), key=lambda item: item[1])
