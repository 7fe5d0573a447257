"""Retrieval quality of knowledge bases: recall@5 and MRR@10, vector-only against hybrid (vector +
BM25, reciprocal rank fusion), in one run, on a shipped corpus and question set.

Corpus and questions: benchmarks/data/rag_corpus and benchmarks/data/rag_questions.json (the
project's own documentation, frozen; see "source" in the JSON). A hit is relevant when it comes
from the question's file and contains the question's answer phrase.
Run: .venv/bin/python -m benchmarks.rag_quality
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write_result

DATA = Path(__file__).parent / "data"


def main() -> int:
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
    path = write_result("rag_quality", result)
    print_table(
        f"retrieval quality ({len(questions)} questions, {chunks} chunks)",
        [
            ("retriever", "recall@5", "MRR@10"),
            ("vector only (baseline)", result["recall_at_5_vector"], result["mrr_vector"]),
            ("hybrid (vector + BM25, RRF)", result["recall_at_5_hybrid"], result["mrr_hybrid"]),
        ],
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
