"""The upgrade to schema 3 on the frozen state of release 0.1.0, brought to schema 2 first: each
knowledge base's chunks and keyword index move into its own directory unchanged (the index moved,
not rebuilt), a crash mid-move runs again cleanly, and nothing of the shared layout is left."""

from __future__ import annotations

import chromadb
import pytest
from appliance.rag import layout_move
from appliance.rag.access import Principal
from appliance.rag.chunking import Chunk
from appliance.rag.keywords import KeywordIndex
from appliance.rag.registry import Registry
from appliance.rag.store import KnowledgeBaseStore
from chromadb.config import Settings

from appliance import state_version as sv
from appliance.upgrade import runner
from appliance.upgrade.steps import STEPS
from tests.unit.test_state_migrations import _frozen_state

ALICE = Principal("alice")
PLANTED = "zymurgy is the chemistry of fermentation"


def _shared_chunks(rag) -> dict[str, str]:
    with chromadb.PersistentClient(rag / "chroma", Settings(anonymized_telemetry=False)) as client:
        (collection,) = client.list_collections()
        got = client.get_collection(collection.name).get(include=["documents"])
    return dict(zip(got["ids"], got["documents"], strict=True))


def test_a_schema_2_state_moves_into_a_directory_per_knowledge_base(tmp_path, monkeypatch):
    settings = _frozen_state(tmp_path)
    rag = settings.rag_dir
    runner.migrate(settings, STEPS[:2])
    assert sv.read_record(settings.state_dir).version == 2
    before = _shared_chunks(rag)
    # A keyword index as schema 2 kept it, with a row of the current version that Chroma lacks:
    # found after the move only if the index was moved, not built again.
    (kb,) = Registry(rag / "registry.sqlite3").knowledge_bases()
    version = Registry(rag / "registry.sqlite3").documents(kb.id)[0].version
    old_index = KeywordIndex(rag / "keywords" / f"{kb.collection}.sqlite3")
    old_index.create()
    old_index.add_many(
        [(version, "planted", Chunk("x", PLANTED, "planted.txt", 999, None, None, None))]
    )
    # The index keeps the chunks' text (Chroma's copy is only for building a missing index).
    rows = [(*chunk_id.rsplit("-", 1), text) for chunk_id, text in before.items()]
    old_index.add_many(
        (row_version, "d", Chunk("", text, "f.txt", int(position), None, None, None))
        for row_version, position, text in rows
    )

    def crash(*_args) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(layout_move, "_move_keywords", crash)
        with pytest.raises(OSError, match="power cut"):
            runner.migrate(settings)
    assert sv.read_record(settings.state_dir).version == 2
    assert (rag / "chroma").is_dir() and old_index.exists()  # the shared copies stay

    assert [step.name for step in runner.migrate(settings)] == ["kb-directories"]
    assert sv.read_record(settings.state_dir).version == sv.SCHEMA_VERSION
    assert not (rag / "chroma").exists() and not (rag / "keywords").exists()
    assert sorted(p.name for p in (rag / "kbs").iterdir()) == [kb.collection]

    store = KnowledgeBaseStore(rag, settings.rag)
    try:
        chunks = store.chunks(ALICE, kb.id)  # the moved keyword index keeps the text
        assert {chunk.id: chunk.text for chunk in chunks} == {**before, f"{version}-999": PLANTED}
        assert store._collection(kb).count() == len(before)  # upserted once, not twice
        found = store.keyword_search(ALICE, kb.id, "zymurgy fermentation", 5)
        assert [chunk.text for chunk, _ in found] == [PLANTED]
        assert store.search(ALICE, kb.id, store.embedder.embed([chunks[0].text])[0], 1)
    finally:
        store.close()
