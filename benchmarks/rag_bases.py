"""Knowledge bases of synthetic chunks for rag_speed, written in bulk and kept between runs.

Loading a million chunks through uploads (a transaction, a Chroma write and a registry flip per
document, with fsyncs) would take about an hour here; this writes the same rows through the
same code (KeywordIndex.add_many, the store's Chroma metadata, Registry._replace) in batches of
thousands of chunks, with pseudo-random unit vectors instead of embeddings. A built store is kept
under CACHE in a directory named by what it was built from, so a rerun opens it instead.

The text is the frozen documentation corpus's sentences with a fifth of their words replaced by
words of a Zipf-distributed synthetic vocabulary: without that, 205 sentences repeated over a
million chunks would make every word common, which no real corpus does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from bisect import bisect
from itertools import accumulate
from pathlib import Path

from benchmarks.rag_speed import sentences

# /var/tmp survives reboots; the build of a million chunks takes about 20 minutes and ~10 GB.
CACHE = Path(os.environ.get("APPLIANCE_RAG_BENCH_CACHE", "/var/tmp/appliance-rag-bench"))
# Part of the directory name: change it when the text, the vectors or the layout change.
FORMAT = 1
KB = "big"
CHUNKS_PER_DOCUMENT = 10
CHUNKS_PER_BATCH = 5000
VOCABULARY = 300_000
REPLACED = 0.2
CHUNK_CHARS = 600
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def pseudo_word(rank: int) -> str:
    """A pronounceable made-up word, one per rank (at least two syllables)."""
    parts = []
    rank += len(_SYLLABLES)
    while rank:
        rank, digit = divmod(rank, len(_SYLLABLES))
        parts.append(_SYLLABLES[digit])
    return "".join(parts)


class SyntheticText:
    """Chunk-sized texts: corpus sentences with words replaced by Zipf-ranked made-up words."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = [s.split() for s in sentences()]
        self.words = [pseudo_word(rank) for rank in range(VOCABULARY)]
        # Zipf's law with exponent 1: the word of rank r is drawn in proportion to 1 / r.
        self.cumulative = list(accumulate(1 / rank for rank in range(1, VOCABULARY + 1)))

    def chunk(self) -> str:
        rng, total = self.rng, self.cumulative[-1]
        words: list[str] = []
        length = 0
        while length < CHUNK_CHARS - 150:
            for word in rng.choice(self.pool):
                if rng.random() < REPLACED:
                    word = self.words[bisect(self.cumulative, rng.random() * total)]
                words.append(word)
                length += len(word) + 1
        return " ".join(words)

    def question(self) -> str:
        """Eight words as a chunk has them: what a user remembers of a passage."""
        words = self.chunk().split()
        start = self.rng.randrange(max(1, len(words) - 8))
        return " ".join(words[start : start + 8])


def base_dir(chunks: int, seed: int) -> Path:
    import chromadb

    return CACHE / f"chunks{chunks}-seed{seed}-format{FORMAT}-chroma{chromadb.__version__}"


def cached_base(who, chunks: int, seed: int, embedder) -> tuple[Path, dict]:
    """The root of a store holding knowledge base KB of `chunks` chunks, built unless a complete
    one is kept; and how it was built (seconds, documents)."""
    root = base_dir(chunks, seed)
    done = root / "built.json"
    if done.exists():
        return root, json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)  # an interrupted build
    t0 = time.perf_counter()
    documents = _build(root, who, chunks, seed, embedder)
    info = {"build_s": round(time.perf_counter() - t0, 1), "documents": documents}
    done.write_text(json.dumps(info))
    return root, info


def _build(root: Path, who, chunks: int, seed: int, embedder) -> int:
    import numpy as np
    from appliance.rag.chunking import Chunk
    from appliance.rag.registry import DocumentRecord, now
    from appliance.rag.store import KnowledgeBaseStore, _metadata, document_id

    store = KnowledgeBaseStore(root, embedder=embedder)
    kb = store.create(who, KB)
    collection = store._collection(kb)
    index = store._keywords(kb.collection)
    text = SyntheticText(seed)
    vectors = np.random.default_rng(seed)
    made = 0
    while made < chunks:
        batch = min(CHUNKS_PER_BATCH, chunks - made)
        records, rows = [], []
        for start in range(made, made + batch, CHUNKS_PER_DOCUMENT):
            count = min(CHUNKS_PER_DOCUMENT, made + batch - start)
            filename = f"doc-{start // CHUNKS_PER_DOCUMENT:07d}.txt"
            record = DocumentRecord(
                document_id(filename), filename, uuid.uuid4().hex, f"bench-{start}", count, now()
            )
            records.append(record)
            rows += [
                (record, Chunk("", text.chunk(), filename, i, None, None, None))
                for i in range(count)
            ]
        index.add_many((record.version, record.id, chunk) for record, chunk in rows)
        unit = vectors.standard_normal((len(rows), embedder.dimension), dtype=np.float32)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        collection.add(
            ids=[f"{record.version}-{chunk.index}" for record, chunk in rows],
            embeddings=unit,
            documents=[chunk.text for _, chunk in rows],
            metadatas=[_metadata(record, chunk) for record, chunk in rows],
        )
        # The registry flip of each document, without its loose-version note: nothing else
        # writes this store while it is built, and an interrupted build is thrown away.
        with store._registry._transaction() as db:
            for record in records:
                store._registry._replace(db, kb, record.id, record)
        made += batch
        print(f"  built {made} of {chunks} chunks", flush=True)
    return -(-chunks // CHUNKS_PER_DOCUMENT)
