"""Hybrid retrieval with the real embedding model: FTS5 keywords, rank fusion, access, reranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from appliance.rag.chunking import Chunk
from appliance.rag.embeddings import Embedder, cpu_has_native_bfloat16, default_model_dir
from appliance.rag.errors import KnowledgeBaseNotFound
from appliance.rag.keywords import MAX_QUERY_TERMS, match_expression, query_terms
from appliance.rag.reranking import Reranker
from appliance.rag.retrieval import Retriever, reciprocal_rank_fusion
from appliance.rag.store import KnowledgeBaseStore, document_id

from appliance.errors import ApplianceError
from tests.unit.rag_corpus import ALICE, BOB, SMALL_CHUNKS, VALVE_NOTE, corpus, document


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeBaseStore:
    store = KnowledgeBaseStore(tmp_path_factory.mktemp("rag"), SMALL_CHUNKS)
    store.create(ALICE, "manuals")
    store.add_documents(ALICE, "manuals", corpus())
    return store


@pytest.fixture(scope="module")
def hostile(store: KnowledgeBaseStore) -> KnowledgeBaseStore:
    store.create(ALICE, "hostile")
    store.add_documents(ALICE, "hostile", [document("q.txt", ["foo NEAR start drop table"])])
    return store


@pytest.fixture(scope="module")
def retriever(store: KnowledgeBaseStore) -> Retriever:
    return Retriever(store)


def _chunk(chunk_id: str) -> Chunk:
    return Chunk(chunk_id, chunk_id, "f.txt", 0, None, None, None, kb="kb", document_id="doc")


# Pieces


def test_query_terms_are_lowercased_words_without_stop_words_and_quoted():
    terms = query_terms("The XK-4471 gasket, and Überdruck_Ventil! gasket")
    assert terms == ["xk", "4471", "gasket", "überdruck_ventil"]
    assert match_expression(terms) == '"xk" OR "4471" OR "gasket" OR "überdruck_ventil"'
    assert len(query_terms(" ".join(f"w{n}" for n in range(500)))) == MAX_QUERY_TERMS


def test_keyword_ranking_is_bm25_rare_terms_and_short_chunks_first(store: KnowledgeBaseStore):
    store.create(ALICE, "bm25")
    docs = [("a.txt", "pump seal"), ("b.txt", "pump pump bearing grease"), ("c.txt", "bread")]
    store.add_documents(ALICE, "bm25", [document(name, [text]) for name, text in docs])

    def ranked(query: str) -> list[str]:
        return [c.filename for c, _ in store.keyword_search(ALICE, "bm25", query, 5)]

    assert ranked("pump") == ["b.txt", "a.txt"]  # two occurrences beat one
    assert ranked("bread seal")[0] == "c.txt"  # as rare as "seal", in a shorter chunk
    assert ranked("absent") == [] and ranked("the and") == []
    [(chunk, score)] = store.keyword_search(ALICE, "bm25", "Bread", 5)
    assert (chunk.kb, chunk.document_id, chunk.text) == (
        "alice/bm25",
        document_id("c.txt"),
        "bread",
    )
    assert score > 0 and chunk.id in {c.id for c in store.chunks(ALICE, "bm25")}


@pytest.mark.parametrize(
    "query",
    ['"foo AND (', "NEAR(a b", "*", "x:y", "^start", "a OR", "'; DROP TABLE chunks; --", "\0\x00"],
)
def test_hostile_queries_are_words_not_syntax(hostile: KnowledgeBaseStore, query: str):
    found = hostile.keyword_search(ALICE, "hostile", query, 5)
    assert all(chunk.filename == "q.txt" for chunk, _ in found)


def test_rrf_adds_reciprocal_ranks_and_records_who_found_what():
    a, b, c = _chunk("a"), _chunk("b"), _chunk("c")
    hits = reciprocal_rank_fusion({"vector": [a, b], "keyword": [c, b]}, k=60)
    assert [hit.chunk.id for hit in hits] == ["b", "a", "c"]
    assert hits[0].score == pytest.approx(2 / 62)
    assert hits[0].ranks == {"vector": 2, "keyword": 2}
    assert hits[1].ranks == {"vector": 1} and hits[2].ranks == {"keyword": 1}


def test_embeddings_are_normalized_batched_and_the_model_loaded_once(store: KnowledgeBaseStore):
    embedder = Embedder(batch_size=2)
    texts = ["one", "two", "three"]
    batches = list(embedder.embed_batches(texts))
    assert [(start, len(vectors)) for start, vectors in batches] == [(0, 2), (2, 1)]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, 384)
    assert [round(float((v**2).sum()), 4) for v in vectors] == [1.0, 1.0, 1.0]
    assert embedder._model is store.embedder._model  # the cache, shared by path and device


def test_bfloat16_vectors_agree_with_float32(tmp_path):
    texts = ["The pump bearings are greased every 500 hours.", "Quarterly revenue rose by 4%."]
    exact = Embedder(precision="float32", device="cpu").embed(texts)
    fast = Embedder(precision="bfloat16", device="cpu").embed(texts)
    assert fast.dtype == exact.dtype == np.float32
    assert [round(float((v**2).sum()), 4) for v in fast] == [1.0, 1.0]
    assert min(float(c) for c in (fast * exact).sum(axis=1)) > 0.999


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bfloat16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not cpu_has_native_bfloat16(info)
    assert not cpu_has_native_bfloat16(tmp_path / "missing")


# Retrieval


def test_hybrid_finds_a_rare_part_number_that_vector_search_ranks_low(retriever: Retriever):
    vector_only = retriever.retrieve(ALICE, ["manuals"], "XK-4471", top_k=10, vector_only=True)
    vector_texts = [hit.chunk.text for hit in vector_only]
    assert VALVE_NOTE not in vector_texts[:3]  # look-alike part numbers rank above it
    [first, *_] = retriever.retrieve(ALICE, ["manuals"], "XK-4471", top_k=10)
    assert first.chunk.text == VALVE_NOTE
    assert first.ranks["keyword"] == 1 and first.ranks["vector"] > 3


def test_a_question_finds_its_topic_by_meaning_with_its_source(retriever: Retriever):
    hits = retriever.retrieve(ALICE, ["manuals"], "How often must the bearings be lubricated?")
    assert len(hits) == SMALL_CHUNKS.top_k
    top = hits[0].chunk
    assert (top.filename, top.page, top.kb) == ("pumps.pdf", 3, "alice/manuals")
    assert "greased every 500" in top.text and hits[0].ranks["vector"] == 1
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_retrieval_needs_read_access_to_every_knowledge_base(
    store: KnowledgeBaseStore, retriever: Retriever
):
    store.create(BOB, "bob-notes")
    with pytest.raises(KnowledgeBaseNotFound, match="'bob-notes' not found"):
        retriever.retrieve(ALICE, ["manuals", "bob-notes"], "pump")
    store.share(BOB, "bob-notes", readers=["alice"], groups=[])
    assert retriever.retrieve(ALICE, ["manuals", "bob-notes"], "pump")


def test_search_spans_knowledge_bases_and_sees_documents_added_later(
    store: KnowledgeBaseStore, retriever: Retriever
):
    store.create(ALICE, "later")
    assert retriever.retrieve(ALICE, ["later"], "zeppelin") == []
    store.add_documents(ALICE, "later", [document("air.txt", ["The zeppelin LZ-129 flew."])])
    [first, *_] = retriever.retrieve(ALICE, ["manuals", "later"], "LZ-129 zeppelin")
    assert (first.chunk.kb, first.chunk.filename) == ("alice/later", "air.txt")
    assert set(first.ranks) == {"vector", "keyword"}


def test_a_reranker_rescores_the_fused_candidates(store: KnowledgeBaseStore):
    # No cross-encoder is installed: the embedding model's encoder under a fresh scoring head
    # stands in. Its scores mean nothing, but they must be the order of the result.
    reranker = Reranker(default_model_dir(), device="cpu")
    hits = Retriever(store, reranker).retrieve(ALICE, ["manuals"], "pump seal", top_k=3)
    fused = Retriever(store).retrieve(
        ALICE, ["manuals"], "pump seal", top_k=SMALL_CHUNKS.candidates
    )
    scores = reranker.scores("pump seal", [hit.chunk.text for hit in fused])
    best = sorted(zip(scores, (hit.chunk.id for hit in fused), strict=True), reverse=True)[:3]
    assert [hit.chunk.id for hit in hits] == [chunk_id for _, chunk_id in best]
    assert [hit.score for hit in hits] == pytest.approx([score for score, _ in best])


def test_a_model_directory_that_is_not_one_is_refused(tmp_path: Path):
    with pytest.raises(
        ApplianceError, match=r"rag.reranker_model: .* is not a local model directory"
    ):
        Reranker(tmp_path).scores("q", ["text"])
