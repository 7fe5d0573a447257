"""Knowledge-base speed: ingest throughput with the default embedding model, query latency
(p50, p99) of hybrid retrieval at 100k and 1M chunks, the first query after an upload, memory,
and a second folder sync of 10k unchanged files; each against a baseline in the same run.

- Ingest: synthetic documents (sentences drawn from the frozen documentation corpus) parsed,
  chunked, embedded (the configured backend, rag.embedding_backend) and stored; baselines in
  the same interleaved rounds: that backend alone on the same chunk texts, float32 torch alone,
  bare Chroma storing them with their vectors.
- Queries: knowledge bases built in bulk with pseudo-random vectors and kept between runs
  (benchmarks/rag_bases.py); each query is embedded with the real model, so its latency
  includes that. Interleaved with it: bare Chroma (a precomputed vector), bare FTS5 (bm25() over
  every chunk with a query word), the embedding alone, and each side of the hybrid search.
- Sync: the CLI's folder walk and hashes plus rag.sync.sync; baseline: the walk and hashes.
Run: .venv/bin/python -m benchmarks.rag_speed [--sizes 100000 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.common import RESULTS_DIR, percentile, print_table, write_result

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


def measure_queries(size: int, queries: int) -> dict:
    """Hybrid query latency on a knowledge base of `size` chunks, interleaved with its
    baselines and parts; then the first query after each of a few uploads; then memory.

    Run in a process of its own (see main), so its memory is this base's alone.
    """
    import resource

    import psutil
    from appliance.rag.embeddings import Embedder
    from appliance.rag.ingest import parse_many
    from appliance.rag.keywords import match_expression, query_terms
    from appliance.rag.retrieval import Retriever
    from appliance.rag.store import KnowledgeBaseStore
    from appliance.security.api_keys import Principal

    from benchmarks.rag_bases import KB, SyntheticText, cached_base

    who = Principal("bench", admin=True)
    real = Embedder()
    embedder = BulkEmbedder(real)
    root, built = cached_base(who, size, seed=1, embedder=embedder)
    t0 = time.perf_counter()
    store = KnowledgeBaseStore(root, embedder=embedder)
    retriever = Retriever.from_settings(store)
    kb = store.get(who, KB)
    n = store.settings.candidates
    text = SyntheticText(seed=7)
    asks = [text.question() for _ in range(queries)]
    retriever.retrieve(who, [KB], asks[0])
    first_after_open_s = time.perf_counter() - t0
    collection = store._collection(kb)
    keywords = store._keywords(kb.collection)

    def bare_fts5(q: str) -> list[str]:
        # FTS5 as it comes: bm25() over every chunk holding any query word.
        with contextlib.closing(keywords._connect()) as db:
            rows = db.execute(
                "SELECT chunks.chunk_id FROM (SELECT rowid, rank FROM terms WHERE terms MATCH ?"
                " ORDER BY rank LIMIT ?) AS ranked JOIN chunks ON chunks.rowid = ranked.rowid"
                " ORDER BY ranked.rank",
                (match_expression(query_terms(q)), n),
            )
            return [chunk_id for (chunk_id,) in rows]

    # Each path asks questions of its own: one asked twice finds its chunks and postings in
    # the page cache the second time (at 1M, a cold hybrid query was 3 to 10 times a warm one).
    own = {name: [text.question() for _ in range(queries)] for name in _PATHS}
    vectors = {q: real.embed([q])[0].tolist() for q in own["bare_chroma"] + own["vector_side"]}
    parts = {
        "hybrid": lambda q: retriever.retrieve(who, [KB], q),
        "bare_chroma": lambda q: collection.query(query_embeddings=[vectors[q]], n_results=n),
        "bare_fts5": bare_fts5,
        "embedding": lambda q: real.embed([q]),
        "vector_side": lambda q: store.search(who, KB, vectors[q], n),
        "keyword_side": lambda q: store.keyword_search(who, KB, q, n),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for turn in range(queries):
        # Every path in turn, in an order that rotates: all see the same machine.
        names = list(parts)
        names = names[turn % len(names) :] + names[: turn % len(names)]
        for name in names:
            t0 = time.perf_counter()
            parts[name](own[name][turn])
            times[name].append((time.perf_counter() - t0) * 1000)
    overlap = []
    for q in own["keyword_side"][:20]:
        exact = bare_fts5(q)[:10]
        if exact:
            ours = {chunk.id for chunk, _ in store.keyword_search(who, KB, q, n)[:10]}
            overlap.append(len(ours & set(exact)) / len(exact))

    # The first query after an upload: one document replaced, then a new question at once.
    uploads = []
    for round_ in range(5):
        body = " ".join(text.chunk() for _ in range(8)) + f" upload round {round_} {time.time()}"
        docs, _ = parse_many([(body.encode(), "uploaded.txt")])
        t0 = time.perf_counter()
        store.add_documents(who, KB, docs)
        upload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        retriever.retrieve(who, [KB], text.question())
        uploads.append(((time.perf_counter() - t0) * 1000, upload_s))
    store.delete_document(who, KB, "uploaded.txt")  # the kept base stays as built
    p50 = {name: percentile(values, 50) for name, values in times.items()}
    after_upload = [ms for ms, _ in uploads]
    return {
        "chunks": size,
        "documents": built["documents"],
        "build_s": built["build_s"],
        "first_query_after_open_s": round(first_after_open_s, 2),
        "p50_ms": round(p50["hybrid"], 2),
        "p99_ms": round(percentile(times["hybrid"], 99), 2),
        **{f"{name}_p50_ms": round(p50[name], 2) for name in parts if name != "hybrid"},
        "keyword_side_p99_ms": round(percentile(times["keyword_side"], 99), 2),
        "bare_fts5_p99_ms": round(percentile(times["bare_fts5"], 99), 2),
        "p50_vs_bare_chroma": round(p50["hybrid"] / p50["bare_chroma"], 2),
        "p50_vs_bare_chroma_plus_embedding": round(
            p50["hybrid"] / (p50["bare_chroma"] + p50["embedding"]), 2
        ),
        "keyword_top10_same_as_bare_fts5": round(statistics.mean(overlap), 3),
        "first_query_after_upload_ms": [round(ms, 1) for ms in after_upload],
        "first_query_after_upload_p50_ms": round(percentile(after_upload, 50), 1),
        "upload_s": [round(s, 2) for _, s in uploads],
        "rss_gb": round(psutil.Process().memory_info().rss / 2**30, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def measure_sync_noop(files: int) -> dict:
    """A second folder sync of `files` unchanged files: the CLI's reading of the folder (walk
    and sha256) and the store's sync; baseline: the walk and hashing alone."""
    from appliance.rag.embeddings import Embedder
    from appliance.rag.store import KnowledgeBaseStore
    from appliance.rag.sync import sync
    from appliance.security.api_keys import Principal

    from appliance.cli.kb import _folder
    from benchmarks.rag_bases import KB, cached_folder

    who = Principal("bench", admin=True)
    embedder = BulkEmbedder(Embedder())
    root, folder, built = cached_folder(who, files, embedder)
    store = KnowledgeBaseStore(root, embedder=embedder)
    whole, hashing = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        manifest, _ = _folder(folder)
        hashing.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        manifest, _ = _folder(folder)
        outcomes = sync(store, who, KB, manifest, {})
        whole.append(time.perf_counter() - t0)
        assert {o.status for o in outcomes} == {"unchanged"} and len(outcomes) == files
    return {
        "files": files,
        "build_s": built["build_s"],
        "sync_noop_s": [round(s, 2) for s in whole],
        "hash_folder_s": [round(s, 2) for s in hashing],
        "sync_noop_p50_s": round(percentile(whole, 50), 2),
        "sync_noop_vs_hashing": round(percentile(whole, 50) / percentile(hashing, 50), 2),
    }


def _label(size: int) -> str:
    return f"{size // 1_000_000}m" if size % 1_000_000 == 0 else f"{size // 1000}k"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ingest-chunks", type=int, default=300)
    ap.add_argument(
        "--no-ingest",
        action="store_true",
        help="keep the ingest figures of the last result instead of measuring them",
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--sync-files", type=int, default=10_000)
    args = ap.parse_args()
    from appliance.security.api_keys import Principal

    who = Principal("bench", admin=True)
    if args.no_ingest:
        last = json.loads((RESULTS_DIR / "rag_speed.json").read_text())
        result = {key: last[key] for key in _INGEST_KEYS if key in last}
    else:
        with tempfile.TemporaryDirectory(prefix="rag-speed-") as tmp:
            result = measure_ingest(Path(tmp), who, args.ingest_chunks)
    load = {"before": os.getloadavg()}
    # A process per size: each base's memory is measured alone, as a gateway holding it.
    spawn = multiprocessing.get_context("spawn")
    sizes = {}
    for size in args.sizes:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            sizes[size] = pool.submit(measure_queries, size, args.queries).result()
        load[_label(size)] = os.getloadavg()
    synced = measure_sync_noop(args.sync_files)
    load["after"] = os.getloadavg()
    for size, m in sizes.items():
        label = _label(size)
        result[f"query_p50_ms_{label}"] = m["p50_ms"]
        result[f"query_p99_ms_{label}"] = m["p99_ms"]
        result[f"first_query_after_upload_ms_{label}"] = m["first_query_after_upload_p50_ms"]
        result[f"rss_gb_{label}"] = m["rss_gb"]
        result[f"query_{label}"] = m
    result[f"sync_noop_s_{args.sync_files // 1000}k_files"] = synced["sync_noop_p50_s"]
    result["sync_noop"] = synced
    result["load_average"] = {k: [round(x, 2) for x in v] for k, v in load.items()}
    result["settings"] = vars(args)
    result["targets"] = {
        "ingest_chunks_per_s": ">= 150",
        "query_p50_ms_1m": "< 50",
        "first_query_after_upload_ms_1m": "< 100",
        "sync_noop_s_10k_files": "< 10",
    }
    path = write_result("rag_speed", result)
    rows = [("measure", "value", "baseline (same run)", "ratio")]
    if "ingest_chunks_per_s" in result:
        rows += [
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
            ("", "", f"{result['bare_chroma_add_chunks_per_s']} (bare Chroma add)", ""),
        ]
    for m in sizes.values():
        rows += [
            (
                f"query p50 / p99, {m['chunks']} chunks (ms)",
                f"{m['p50_ms']} / {m['p99_ms']}",
                f"{m['bare_chroma_p50_ms']} bare Chroma + {m['embedding_p50_ms']} embedding",
                m["p50_vs_bare_chroma_plus_embedding"],
            ),
            (
                "  keyword side p50 (ms)",
                m["keyword_side_p50_ms"],
                f"{m['bare_fts5_p50_ms']} bare FTS5",
                round(m["keyword_side_p50_ms"] / m["bare_fts5_p50_ms"], 3),
            ),
            (
                "  first query after an upload p50 (ms)",
                m["first_query_after_upload_p50_ms"],
                f"{m['p50_ms']} any query p50",
                round(m["first_query_after_upload_p50_ms"] / m["p50_ms"], 2),
            ),
            ("  memory of the process (GB)", m["rss_gb"], f"peak {m['peak_rss_gb']}", ""),
        ]
    rows.append(
        (
            f"second sync of {synced['files']} unchanged files (s)",
            synced["sync_noop_p50_s"],
            f"{percentile(synced['hash_folder_s'], 50):.2f} hashing the folder",
            synced["sync_noop_vs_hashing"],
        )
    )
    print_table("knowledge-base speed (hybrid retrieval, default embedding model)", rows)
    print(f"\nload average (1, 5, 15 min): {result['load_average']}")
    print(f"wrote {path}")
    return 0


_PATHS = ("hybrid", "bare_chroma", "bare_fts5", "embedding", "vector_side", "keyword_side")
# What measure_ingest returns (kept by --no-ingest), and where the ingest part was run.
_INGEST_KEYS = (
    "ingest_chunks_per_s",
    "embedding_backend",
    "embedding_only_chunks_per_s",
    "embedding_only_torch_float32_chunks_per_s",
    "bare_chroma_add_chunks_per_s",
    "ingest_vs_embedding_only",
    "ingest_vs_torch_float32_embedding_only",
    "embedding_vs_torch_float32",
    "ingest_rounds_chunks_per_s",
    "ingest_chunks",
    "ingest_errors",
    "mean_chunk_chars",
    "ingest_load_average_1min",
    "ingest_date",
    "ingest_machine",
)


if __name__ == "__main__":
    sys.exit(main())
