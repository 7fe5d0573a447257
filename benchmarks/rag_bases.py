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

import hashlib
import itertools
import json
import os
import random
import shutil
import time
import uuid
from bisect import bisect
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path

from benchmarks.rag_speed import sentences

# /var/tmp survives reboots; the build of a million chunks takes about 20 minutes and ~10 GB.
CACHE = Path(os.environ.get("APPLIANCE_RAG_BENCH_CACHE", "/var/tmp/appliance-rag-bench"))
# Part of the directory name: change it when the text, the vectors or the layout change.
FORMAT = 2
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


def base_dir(name: str) -> Path:
    import chromadb

    return CACHE / f"{name}-format{FORMAT}-chroma{chromadb.__version__}"


def cached_base(who, chunks: int, seed: int, embedder) -> tuple[Path, dict]:
    """The root of a store whose knowledge base KB has `chunks` chunks of SyntheticText in
    documents of CHUNKS_PER_DOCUMENT, built unless a complete one is kept; and its build's
    seconds and documents."""
    text = SyntheticText(seed)

    def documents() -> Iterator[tuple[str, str | None, list[str]]]:
        for start in range(0, chunks, CHUNKS_PER_DOCUMENT):
            count = min(CHUNKS_PER_DOCUMENT, chunks - start)
            name = f"doc-{start // CHUNKS_PER_DOCUMENT:07d}.txt"
            yield name, None, [text.chunk() for _ in range(count)]

    return _cached(base_dir(f"chunks{chunks}-seed{seed}"), who, documents(), embedder)


def cached_folder(who, files: int, embedder) -> tuple[Path, Path, dict]:
    """A folder of `files` small text files, and the root of a store whose knowledge base KB
    holds them as a folder sync leaves them (their file hashes recorded); built unless kept."""
    root = base_dir(f"folder{files}")
    folder = root / "folder"
    text = SyntheticText(files)

    def documents() -> Iterator[tuple[str, str | None, list[str]]]:
        for n in range(files):
            name = f"part{n // 1000:02d}/note-{n:05d}.txt"
            body = text.chunk()
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            yield name, hashlib.sha256(body.encode()).hexdigest(), [body]

    root, info = _cached(root, who, documents(), embedder)
    return root, folder, info


def _cached(root: Path, who, documents, embedder) -> tuple[Path, dict]:
    done = root / "built.json"
    if done.exists():
        return root, json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)  # an interrupted build
    t0 = time.perf_counter()
    count = _build(root, who, documents, embedder)
    info = {"build_s": round(time.perf_counter() - t0, 1), "documents": count}
    done.write_text(json.dumps(info))
    return root, info


def _build(root: Path, who, documents, embedder) -> int:
    """Write (file name, file hash, chunk texts) documents into a new store's knowledge base KB
    in batches of about CHUNKS_PER_BATCH chunks; returns how many documents."""
    import numpy as np
    from appliance.rag.chunking import Chunk
    from appliance.rag.registry import DocumentRecord, now
    from appliance.rag.store import KnowledgeBaseStore, _metadata, document_id

    store = KnowledgeBaseStore(root, embedder=embedder)
    kb = store.create(who, KB)
    collection = store._collection(kb)
    index = store._keywords(kb.collection)
    vectors = np.random.default_rng(0)
    written = chunks = 0
    batches = iter(documents)
    while batch := list(itertools.islice(batches, CHUNKS_PER_BATCH // CHUNKS_PER_DOCUMENT)):
        records, rows = [], []
        for filename, source_hash, texts in batch:
            record = DocumentRecord(
                document_id(filename),
                filename,
                uuid.uuid4().hex,
                f"bench-{written + len(records)}",
                len(texts),
                now(),
                source_hash,
            )
            records.append(record)
            rows += [
                (record, Chunk("", text, filename, i, None, None, None))
                for i, text in enumerate(texts)
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
        written += len(records)
        chunks += len(rows)
        print(f"  {root.name}: {chunks} chunks written", flush=True)
    return written
