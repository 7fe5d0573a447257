"""Embedding backends side by side: speed (chunks/s) and retrieval quality (SciFact recall@10)
of each of rag.embedding_backend x rag.embedding_precision, against float32 torch in the same run.

- Speed: the chunks of benchmarks.rag_speed's ingest documents, embedded in batches of
  rag.embedding_batch_size as an upload does; rounds interleave the backends (the machine is
  shared), and each backend's ratio to float32 torch is the median of its per-round ratios.
- Quality: every chunk of SciFact's 5183 abstracts (benchmarks/scifact.py) and its 300 claims
  embedded by each backend; vector search by exact cosine (a document ranks where its best chunk
  does), recall@10 as in benchmarks.rag_quality. Also "mixed": the claims of this backend
  against float32 torch's chunks, a knowledge base built before the backend was changed.
Run: .venv/bin/python -m benchmarks.embedding_backends [--scifact PATH] [--rounds 3]
(about 30 minutes on 2 cores, almost all of it embedding SciFact once per backend).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import scifact
from benchmarks.common import print_table, write_result
from benchmarks.rag_speed import synthetic_documents

BASELINE = ("torch", "float32")
BACKENDS = (
    BASELINE,
    ("torch", "bfloat16"),
    ("onnx", "float32"),
    ("onnx", "int8"),
    ("openvino", "float32"),
    ("openvino", "bfloat16"),
)
# Recall may drop at most this much below float32 torch's (issue 28).
RECALL_TOLERANCE = 0.01


def label(backend: tuple[str, str]) -> str:
    return "-".join(backend)


def embedder(backend: tuple[str, str], cache_dir: Path, batch_size: int | None = None):
    from appliance.rag.embeddings import Embedder

    from appliance.config.rag import RagSettings

    size = batch_size or RagSettings().embedding_batch_size
    name, precision = backend
    return Embedder(
        device="cpu", backend=name, precision=precision, cache_dir=cache_dir, batch_size=size
    )


def chunk_texts(files: list[tuple[bytes, str]]) -> list[str]:
    """The chunks an upload of these files makes, with the default settings."""
    from appliance.rag.chunking import chunk_document
    from appliance.rag.ingest import parse_many

    from appliance.config.rag import RagSettings

    settings = RagSettings()
    docs, _ = parse_many(files)
    return [
        chunk.text
        for doc in docs
        for chunk in chunk_document(doc, settings.chunk_chars, settings.chunk_overlap_chars)
    ]


def measure_speed(cache_dir: Path, chunks: int, rounds: int) -> dict[str, dict]:
    texts = chunk_texts(synthetic_documents(max(1, chunks // 5), 2600, seed=1))
    embedders = {backend: embedder(backend, cache_dir) for backend in BACKENDS}
    for e in embedders.values():
        e.embed(texts[:32])  # loads the model (and makes the export) outside the timing
    per_round: dict[tuple[str, str], list[float]] = {backend: [] for backend in BACKENDS}
    for r in range(rounds):
        # Rotated order: no backend always runs first (or right after the slowest).
        order = BACKENDS[r % len(BACKENDS) :] + BACKENDS[: r % len(BACKENDS)]
        for backend in order:
            t0 = time.perf_counter()
            embedders[backend].embed(texts)
            per_round[backend].append(len(texts) / (time.perf_counter() - t0))
    base = per_round[BASELINE]
    return {
        label(backend): {
            "chunks_per_s": round(statistics.median(speeds), 1),
            "chunks_per_s_rounds": [round(s, 1) for s in speeds],
            "vs_torch_float32": round(
                statistics.median(s / b for s, b in zip(speeds, base, strict=True)), 2
            ),
        }
        for backend, speeds in per_round.items()
    }


def measure_recall(
    cache_dir: Path, public: scifact.PublicSet, backends: list[tuple[str, str]], done=None
) -> dict[str, dict]:
    """SciFact measures per backend (float32 torch first: the others compare with it); `done`
    is called with the results so far after each backend, so a long run keeps what it has."""
    import numpy as np

    files = [(a.text.encode(), f"{a.doc_id}.txt") for a in public.corpus]
    from appliance.rag.chunking import chunk_document
    from appliance.rag.ingest import parse_many

    from appliance.config.rag import RagSettings

    settings = RagSettings()
    docs, _ = parse_many(files)
    owners, texts = [], []
    for doc in docs:
        for chunk in chunk_document(doc, settings.chunk_chars, settings.chunk_overlap_chars):
            owners.append(doc.filename.removesuffix(".txt"))
            texts.append(chunk.text)
    owner_ids = np.array(owners)
    # Embedded longest first in large batches: only the speed of this step changes (less padding).
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    claims = [q.text for q in public.queries]

    def rankings(chunk_vectors, query_vectors) -> list[list[str]]:
        scores = query_vectors @ chunk_vectors.T
        out = []
        for row in scores:
            best = np.argsort(-row)[:200]
            out.append(scifact.distinct(owner_ids[best].tolist())[:10])
        return out

    vectors: dict[str, tuple] = {}
    results: dict[str, dict] = {}
    for backend in [BASELINE, *(b for b in backends if b != BASELINE)]:
        e = embedder(backend, cache_dir, batch_size=64)
        t0 = time.perf_counter()
        sorted_vectors = e.embed([texts[i] for i in order])
        chunk_vectors = np.empty_like(sorted_vectors)
        chunk_vectors[order] = sorted_vectors
        seconds = time.perf_counter() - t0
        query_vectors = e.embed(claims)
        vectors[label(backend)] = (chunk_vectors, query_vectors)
        own = scifact.measures(rankings(chunk_vectors, query_vectors), public.queries)
        base_chunks, _ = vectors[label(BASELINE)]
        mixed = scifact.measures(rankings(base_chunks, query_vectors), public.queries)
        cosine = np.sum(chunk_vectors * base_chunks, axis=1)
        results[label(backend)] = {
            "recall_at_10": own["recall_at_10"],
            "ndcg_at_10": own["ndcg_at_10"],
            "recall_at_10_mixed": mixed["recall_at_10"],
            "chunk_cosine_to_float32_min": round(float(cosine.min()), 5),
            "chunk_cosine_to_float32_mean": round(float(cosine.mean()), 5),
            "corpus_embed_s": round(seconds, 1),
        }
        base = results[label(BASELINE)]["recall_at_10"]
        r = results[label(backend)]
        r["recall_at_10_delta"] = round(r["recall_at_10"] - base, 3)
        r["recall_at_10_mixed_delta"] = round(r["recall_at_10_mixed"] - base, 3)
        r["recall_within_tolerance"] = r["recall_at_10_delta"] >= -RECALL_TOLERANCE
        print(f"{label(backend)}: {r}", flush=True)
        if done:
            done(results, len(texts))
    return results


def with_distractors(public: scifact.PublicSet, count: int) -> scifact.PublicSet:
    """The set with its corpus cut to every judged-relevant abstract and `count` others."""
    import dataclasses
    import random

    relevant = set().union(*(q.relevant for q in public.queries))
    others = [a.doc_id for a in public.corpus if a.doc_id not in relevant]
    kept = relevant | set(random.Random(0).sample(others, min(count, len(others))))
    corpus = [a for a in public.corpus if a.doc_id in kept]
    return dataclasses.replace(public, corpus=corpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scifact", type=Path, default=scifact.MIRROR)
    parser.add_argument("--chunks", type=int, default=300, help="chunks per speed round (about)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-recall", action="store_true", help="speed only (not a result)")
    parser.add_argument(
        "--distractors",
        type=int,
        help="SciFact corpus cut to the judged-relevant abstracts plus this many others (seeded "
        "sample), for a shared machine that cannot embed all 5183 once per backend; recall is "
        "then higher than on the full corpus, and only the deltas compare",
    )
    parser.add_argument(
        "--recall-backends",
        nargs="+",
        default=[label(b) for b in BACKENDS],
        help="backends whose SciFact recall is measured (embedding the corpus takes 3 to 30 "
        "minutes each on 2 shared cores), e.g. openvino-bfloat16 onnx-int8",
    )
    args = parser.parse_args(argv)
    chosen = [b for name in args.recall_backends for b in BACKENDS if label(b) == name]
    public = None
    if not args.no_recall:
        try:
            public = scifact.load(args.scifact)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
        if args.distractors is not None:
            public = with_distractors(public, args.distractors)
    result: dict = {}
    load_start = round(os.getloadavg()[0], 2)

    def record(recall: dict[str, dict], chunks: int | None) -> None:
        result.update(
            {
                "backends": {name: {**speed[name], **recall.get(name, {})} for name in speed},
                "baseline": label(BASELINE),
                "recall_tolerance": RECALL_TOLERANCE,
                "recall_measured_for": list(recall),
                "public_dataset": public.source if public else None,
                "public_chunks": chunks,
                "public_documents": len(public.corpus) if public else None,
                "settings": vars(args) | {"scifact": str(args.scifact)},
                # The machine is shared: its load beside the figures.
                "load_average_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
            }
        )
        if public:
            write_result("embedding_backends", result)

    with tempfile.TemporaryDirectory(prefix="embedding-backends-") as tmp:
        # A fresh cache: the exports are made by this run, from the shipped weights.
        cache_dir = Path(tmp)
        speed = measure_speed(cache_dir, args.chunks, args.rounds)
        record({}, None)
        if public:
            measure_recall(cache_dir, public, chosen, record)
    rows = [("backend", "chunks/s", "vs float32 torch", "recall@10", "delta", "mixed delta")]
    for name, m in result["backends"].items():
        rows.append(
            (
                name,
                m["chunks_per_s"],
                m["vs_torch_float32"],
                m.get("recall_at_10", "-"),
                m.get("recall_at_10_delta", "-"),
                m.get("recall_at_10_mixed_delta", "-"),
            )
        )
    print_table(
        f"embedding backends ({args.rounds} rounds interleaved; SciFact recall@10, vector only)",
        rows,
    )
    if public:
        print("\nwrote benchmarks/results/embedding_backends.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
