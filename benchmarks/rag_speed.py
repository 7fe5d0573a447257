"""Knowledge-base speed: ingest throughput with the default embedding model, and query latency
(p50, p99) of hybrid retrieval at 10k and 100k chunks, each against a baseline in the same run.

- Ingest: synthetic documents (sentences drawn from the frozen documentation corpus) parsed,
  chunked, embedded (the configured backend, rag.embedding_backend) and stored; baselines in
  the same interleaved rounds: that backend alone on the same chunk texts, float32 torch alone,
  bare Chroma storing them with their vectors.
- Queries: knowledge bases of 10k and 100k chunks. Embedding 100k chunks takes ~40 minutes on
  2 cores, so the chunks are stored with deterministic pseudo-random unit vectors; each query is
  embedded with the real model, so its latency includes that. Baseline: a bare Chroma query with
  a precomputed vector on the same collection (what the store's search adds nothing to).
Run: .venv/bin/python -m benchmarks.rag_speed [--sizes 10000 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import percentile, print_table, write_result

DATA = Path(__file__).parent / "data"


def sentences() -> list[str]:
    text = " ".join(p.read_text() for p in sorted((DATA / "rag_corpus").glob("*.md")))
    text = re.sub(r"[`|#*\[\]()<>]", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]


def synthetic_documents(count: int, chars: int, seed: int) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    pool = sentences()
    docs = []
    for i in range(count):
        body = []
        while sum(len(s) for s in body) < chars:
            body.append(rng.choice(pool))
        docs.append((("\n\n".join(body)).encode(), f"doc-{seed}-{i:06d}.txt"))
    return docs


class BulkEmbedder:
    """The real model for single texts (queries); pseudo-random unit vectors for bulk loads."""

    def __init__(self, real):
        self.real = real
        self.name = real.name
        self.dimension = real.dimension

    def embed(self, texts):
        return self.real.embed(texts) if len(texts) == 1 else self._pseudo(texts)

    def embed_batches(self, texts):
        for start in range(0, len(texts), 5000):
            yield start, self.embed(texts[start : start + 5000])

    def _pseudo(self, texts):
        import numpy as np

        out = np.empty((len(texts), self.dimension), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(self.dimension).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


def measure_ingest(tmp: Path, who, chunks_target: int, rounds: int = 3) -> dict:
    """Ingest with the configured embedding backend (rag.embedding_backend, auto: OpenVINO on
    CPU), against baselines in the same rounds: that backend embedding the same chunk texts
    alone, float32 torch embedding them alone (the old default), and bare Chroma storing them
    with their vectors. Rounds interleave all four; each figure is the median of its rounds."""
    import statistics

    import chromadb
    from appliance.rag.embeddings import Embedder
    from appliance.rag.ingest import parse_many
    from appliance.rag.store import KnowledgeBaseStore

    store = KnowledgeBaseStore(tmp / "ingest")
    embedder: Embedder = store.embedder
    torch32 = Embedder(device="cpu", backend="torch", precision="float32")
    bare = chromadb.PersistentClient(str(tmp / "bare-chroma"))
    files = synthetic_documents(max(1, chunks_target // 5), 2600, seed=1)
    # Loads the models (and makes the export) outside the timing.
    embedder.embed(["warm-up"])
    torch32.embed(["warm-up"])
    rates: dict[str, list[float]] = {"ingest": [], "embed": [], "torch32": [], "chroma": []}
    for r in range(rounds):
        store.create(who, f"ingest-{r}")
        t0 = time.perf_counter()
        docs, errors = parse_many(files)
        results = store.add_documents(who, f"ingest-{r}", docs)
        elapsed = time.perf_counter() - t0
        chunks = sum(result.chunks for result in results)
        rates["ingest"].append(chunks / elapsed)
        texts = [c.text for c in store.chunks(who, f"ingest-{r}")]
        t0 = time.perf_counter()
        vectors = embedder.embed(texts)
        rates["embed"].append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        torch32.embed(texts)
        rates["torch32"].append(len(texts) / (time.perf_counter() - t0))
        collection = bare.create_collection(f"bare-{r}", embedding_function=None)
        t0 = time.perf_counter()
        for start in range(0, len(texts), 1000):
            part = slice(start, start + 1000)
            collection.add(
                ids=[str(i) for i in range(len(texts))][part],
                documents=texts[part],
                embeddings=vectors[part],
                metadatas=[{"version": "v"}] * len(texts[part]),
            )
        rates["chroma"].append(len(texts) / (time.perf_counter() - t0))

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 3)

    backend, precision = embedder.runtime
    return {
        "ingest_chunks_per_s": round(statistics.median(rates["ingest"]), 1),
        "embedding_backend": f"{backend}-{precision}",
        "embedding_only_chunks_per_s": round(statistics.median(rates["embed"]), 1),
        "embedding_only_torch_float32_chunks_per_s": round(statistics.median(rates["torch32"]), 1),
        "bare_chroma_add_chunks_per_s": round(statistics.median(rates["chroma"]), 1),
        "ingest_vs_embedding_only": ratio("ingest", "embed"),
        "ingest_vs_torch_float32_embedding_only": ratio("ingest", "torch32"),
        "embedding_vs_torch_float32": ratio("embed", "torch32"),
        "ingest_rounds_chunks_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ingest_chunks": chunks,
        "ingest_errors": len(errors),
        "mean_chunk_chars": round(sum(map(len, texts)) / max(len(texts), 1)),
        "ingest_load_average_1min": round(os.getloadavg()[0], 2),
    }


def measure_queries(tmp: Path, who, size: int, queries: int) -> dict:
    from appliance.rag.embeddings import Embedder
    from appliance.rag.retrieval import Retriever
    from appliance.rag.store import KnowledgeBaseStore

    real = Embedder()
    store = KnowledgeBaseStore(tmp / f"q{size}", embedder=BulkEmbedder(real))
    store.create(who, "big")
    from appliance.rag.ingest import parse_many

    t0 = time.perf_counter()
    files = synthetic_documents(size // 10, 5000, seed=size)  # ~10 chunks of 600 characters
    docs, _ = parse_many(files)
    for start in range(0, len(docs), 500):
        store.add_documents(who, "big", docs[start : start + 500])
    load_s = time.perf_counter() - t0
    chunks = sum(d.chunks for d in store.documents(who, "big"))
    retriever = Retriever.from_settings(store)
    pool = sentences()
    rng = random.Random(7)
    asks = [" ".join(rng.choice(pool).split()[:8]) for _ in range(queries)]
    t0 = time.perf_counter()
    retriever.retrieve(who, ["big"], asks[0])  # the first query after loading
    first_s = time.perf_counter() - t0
    hybrid = []
    for q in asks:
        t0 = time.perf_counter()
        retriever.retrieve(who, ["big"], q)
        hybrid.append((time.perf_counter() - t0) * 1000)
    collection = store._collection(store.get(who, "big"))
    vectors = real.embed(asks[:50])
    bare = []
    for v in vectors:
        t0 = time.perf_counter()
        collection.query(query_embeddings=[v.tolist()], n_results=30)
        bare.append((time.perf_counter() - t0) * 1000)
    return {
        "chunks": chunks,
        "load_s": round(load_s, 1),
        "first_query_s": round(first_s, 2),
        "p50_ms": round(percentile(hybrid, 50), 2),
        "p99_ms": round(percentile(hybrid, 99), 2),
        "bare_chroma_p50_ms": round(percentile(bare, 50), 2),
        "p50_vs_bare_chroma": round(percentile(hybrid, 50) / percentile(bare, 50), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ingest-chunks", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    from appliance.security.api_keys import Principal

    who = Principal("bench", admin=True)
    with tempfile.TemporaryDirectory(prefix="rag-speed-") as tmp:
        result = measure_ingest(Path(tmp), who, args.ingest_chunks)
        sizes = {size: measure_queries(Path(tmp), who, size, args.queries) for size in args.sizes}
    for size, m in sizes.items():
        label = f"{size // 1000}k"
        result[f"query_p50_ms_{label}"] = m["p50_ms"]
        result[f"query_p99_ms_{label}"] = m["p99_ms"]
        result[f"query_{label}"] = m
    result["settings"] = vars(args)
    result["targets"] = {"ingest_chunks_per_s": ">= 150", "query_p50_ms_100k": "< 50"}
    path = write_result("rag_speed", result)
    rows = [
        ("measure", "value", "baseline", "ratio"),
        (
            f"ingest (chunks/s, {result['embedding_backend']})",
            result["ingest_chunks_per_s"],
            f"{result['embedding_only_chunks_per_s']} (embedding only)",
            result["ingest_vs_embedding_only"],
        ),
        (
            "",
            "",
            f"{result['embedding_only_torch_float32_chunks_per_s']} (float32 torch alone)",
            result["ingest_vs_torch_float32_embedding_only"],
        ),
        (
            "",
            "",
            f"{result['bare_chroma_add_chunks_per_s']} (bare Chroma add)",
            "",
        ),
    ]
    for m in sizes.values():
        rows.append(
            (
                f"query p50 / p99, {m['chunks']} chunks (ms)",
                f"{m['p50_ms']} / {m['p99_ms']}",
                f"{m['bare_chroma_p50_ms']} (bare Chroma p50)",
                m["p50_vs_bare_chroma"],
            )
        )
    print_table("knowledge-base speed (hybrid retrieval, default embedding model)", rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
