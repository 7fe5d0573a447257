"""Knowledge bases in real Chroma: access on every call, replacing documents, crash safety."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import chromadb
import pytest
from appliance.rag import store as store_module
from appliance.rag.errors import (
    AccessDenied,
    IngestError,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
)
from appliance.rag.kb_dirs import KBS_DIR
from appliance.rag.keywords import KeywordIndex
from appliance.rag.registry import Registry
from appliance.rag.store import CHROMA_DIR, KnowledgeBaseStore
from chromadb.api.models.Collection import Collection
from chromadb.config import Settings

from tests.unit.rag_corpus import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    MANUAL_V1,
    MANUAL_V2,
    SMALL_CHUNKS,
    HashEmbedder,
    corpus,
    document,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> KnowledgeBaseStore:
    """A store with the real embedding model and Alice's knowledge base of the test corpus."""
    store = KnowledgeBaseStore(tmp_path / "rag", SMALL_CHUNKS)
    store.create(ALICE, "manuals")
    store.add_documents(ALICE, "manuals", corpus())
    return store


def _open(root: Path) -> KnowledgeBaseStore:
    """A store that embeds without a model: for tests about storage, not meaning."""
    return KnowledgeBaseStore(root, SMALL_CHUNKS, embedder=HashEmbedder(batch_size=2))


def _kb_with_old_manual(root: Path) -> KnowledgeBaseStore:
    """A model-free store whose knowledge base "kb" has manual.txt (version 1) and other.txt."""
    store = _open(root)
    store.create(ALICE, "kb")
    store.add_documents(
        ALICE, "kb", [document("manual.txt", MANUAL_V1), document("other.txt", ["x"])]
    )
    return store


def _texts(store: KnowledgeBaseStore, filename: str) -> list[str]:
    return [chunk.text for chunk in store.chunks(ALICE, "kb") if chunk.filename == filename]


def _stored_chunks(store: KnowledgeBaseStore, kb: str = "kb") -> int:
    """Chunks in the knowledge base's Chroma collection, current or not."""
    return store._collection(store.get(ADMIN, kb)).count()


# Names


@pytest.mark.parametrize("name", ["a", "Team docs 2024", "x.y_z-1", "A" * 64])
def test_valid_names_are_accepted(tmp_path: Path, name: str):
    store = _open(tmp_path)
    assert store.create(ALICE, name).name == name


@pytest.mark.parametrize(
    "name", ["", " lead", "trail ", "a/b", "ä", "A" * 65, "x\ny", ".", "..", ".hidden", "-rf"]
)
def test_invalid_names_are_refused(tmp_path: Path, name: str):
    with pytest.raises(KnowledgeBaseError, match="invalid knowledge base name"):
        _open(tmp_path).create(ALICE, name)


def test_names_are_per_owner(tmp_path: Path):
    """Bob's "kb" is his own, whether or not Alice has one: creating it tells him nothing."""
    store = _open(tmp_path)
    store.create(ALICE, "kb")
    bobs = store.create(BOB, "kb")
    assert (bobs.id, bobs.name, bobs.acl.owner) == ("bob/kb", "kb", "bob")
    with pytest.raises(KnowledgeBaseError, match="you already have a knowledge base named 'kb'"):
        store.create(ALICE, "kb")
    assert store.get(ALICE, "kb").id == "alice/kb"
    assert store.get(BOB, "kb").id == "bob/kb"
    with pytest.raises(KnowledgeBaseNotFound, match="'alice/kb' not found"):
        store.get(BOB, "alice/kb")


def test_a_shared_knowledge_base_is_reached_by_id_or_by_its_unique_name(tmp_path: Path):
    store = _open(tmp_path)
    store.create(ALICE, "docs", readers=["carol"])
    assert store.get(CAROL, "alice/docs").id == "alice/docs"
    assert store.get(CAROL, "docs").id == "alice/docs"  # the only "docs" she may read
    store.create(BOB, "docs", readers=["carol"])
    with pytest.raises(KnowledgeBaseError, match="'alice/docs' or 'bob/docs'"):
        store.get(CAROL, "docs")
    store.create(CAROL, "docs")
    assert store.get(CAROL, "docs").id == "carol/docs"  # her own comes first
    ids = [kb.id for kb in store.knowledge_bases(CAROL)]
    assert ids == ["alice/docs", "bob/docs", "carol/docs"]


@pytest.mark.parametrize("readers", ["bob", ["bob", 5], [""]])
def test_readers_must_be_a_list_of_names(tmp_path: Path, readers):
    store = _open(tmp_path)
    with pytest.raises(KnowledgeBaseError, match="readers must be a list of names"):
        store.create(ALICE, "kb", readers=readers)
    store.create(ALICE, "kb")
    with pytest.raises(KnowledgeBaseError, match="readers must be a list of names"):
        store.share(ALICE, "kb", readers, [])


def test_a_registry_from_before_namespaces_is_migrated(tmp_path: Path):
    """Names of a registry written with one global namespace become ids `owner/name`; the
    documents and their chunks stay reachable."""
    store = _kb_with_old_manual(tmp_path)
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:  # back to the old form
        db.execute("PRAGMA defer_foreign_keys = ON")
        db.execute("UPDATE documents SET kb = 'kb'")
        db.execute("UPDATE knowledge_bases SET name = 'kb'")
        db.execute("DELETE FROM meta WHERE key = 'namespaced_names'")
    reopened = _open(tmp_path)
    assert [kb.id for kb in reopened.knowledge_bases(ALICE)] == ["alice/kb"]
    assert [d.filename for d in reopened.documents(ALICE, "kb")] == ["manual.txt", "other.txt"]
    assert _texts(reopened, "manual.txt") == _texts(store, "manual.txt")
    reopened.create(BOB, "kb")  # the name is Alice's only


# Access


def test_another_user_cannot_see_list_query_add_or_delete(store: KnowledgeBaseStore):
    vector = store.embedder.embed(["pump"])[0]
    assert store.knowledge_bases(BOB) == []
    attempts = [
        lambda: store.get(BOB, "manuals"),
        lambda: store.documents(BOB, "manuals"),
        lambda: store.search(BOB, "manuals", vector, 3),
        lambda: store.chunks(BOB, "manuals"),
        lambda: store.add_documents(BOB, "manuals", [document("x.txt", ["x"])]),
        lambda: store.delete_document(BOB, "manuals", "pumps.pdf"),
        lambda: store.share(BOB, "manuals", ["bob"], []),
        lambda: store.delete(BOB, "manuals"),
    ]
    for attempt in attempts:
        # Exactly what a knowledge base that does not exist gives: nothing leaks.
        with pytest.raises(KnowledgeBaseNotFound, match=r"^knowledge base 'manuals' not found$"):
            attempt()
    with pytest.raises(KnowledgeBaseNotFound, match=r"^knowledge base 'nothing' not found$"):
        store.get(BOB, "nothing")
    assert len(store.documents(ALICE, "manuals")) == 5


def test_a_reader_can_query_but_not_change(store: KnowledgeBaseStore):
    store.share(ALICE, "manuals", readers=["bob"], groups=[])
    assert [kb.name for kb in store.knowledge_bases(BOB)] == ["manuals"]
    [(chunk, _)] = store.search(BOB, "manuals", store.embedder.embed(["Saturn rings"])[0], 1)
    assert chunk.filename == "astronomy.xlsx"
    changes = [
        lambda: store.add_documents(BOB, "manuals", [document("x.txt", ["x"])]),
        lambda: store.delete_document(BOB, "manuals", "pumps.pdf"),
        lambda: store.share(BOB, "manuals", ["bob", "eve"], []),
        lambda: store.delete(BOB, "manuals"),
    ]
    for change in changes:
        with pytest.raises(AccessDenied) as denied:
            change()
        assert type(denied.value) is AccessDenied
        assert str(denied.value) == "user 'bob' may read but not change knowledge base 'manuals'"


def test_group_members_read_and_admins_do_everything(store: KnowledgeBaseStore):
    assert store.knowledge_bases(CAROL) == []
    store.share(ALICE, "manuals", readers=[], groups=["engineering"])
    assert len(store.chunks(CAROL, "manuals")) == len(store.chunks(ALICE, "manuals"))
    with pytest.raises(AccessDenied):
        store.delete_document(CAROL, "manuals", "pumps.pdf")
    store.delete_document(ADMIN, "manuals", "pumps.pdf")
    store.delete(ADMIN, "manuals")
    assert store.knowledge_bases(ALICE) == []


# Documents


def test_chunks_keep_their_source(store: KnowledgeBaseStore):
    by_file = {chunk.filename: chunk for chunk in store.chunks(ALICE, "manuals")}
    assert (by_file["pumps.pdf"].page, by_file["pumps.pdf"].sheet) == (3, None)
    assert by_file["astronomy.xlsx"].sheet == "Planets"
    assert by_file["baking.md"].heading == "Bread"
    assert by_file["overhaul.txt"].page is None


def test_reupload_replaces_the_chunks(tmp_path: Path):
    store = _kb_with_old_manual(tmp_path)
    [result] = store.add_documents(ALICE, "kb", [document("manual.txt", MANUAL_V2)])
    assert (result.status, result.chunks) == ("replaced", len(_texts(store, "manual.txt")))
    new_text = " ".join(_texts(store, "manual.txt"))
    assert all(step in new_text for step in MANUAL_V2) and "old manual" not in new_text
    assert _texts(store, "other.txt") == ["x"]
    assert _stored_chunks(store) == len(store.chunks(ALICE, "kb"))  # old chunks are gone
    assert [d.filename for d in store.documents(ALICE, "kb")] == ["manual.txt", "other.txt"]


def test_an_unchanged_upload_is_skipped_and_an_edit_reembeds_only_new_text(tmp_path: Path):
    store = _open(tmp_path)
    store.create(ALICE, "kb")
    store.add_documents(ALICE, "kb", [document("manual.txt", MANUAL_V2)])
    embedded: list[str] = []
    encode = store.embedder._encode
    store.embedder._encode = lambda texts: embedded.extend(texts) or encode(texts)

    [result] = store.add_documents(ALICE, "kb", [document("manual.txt", MANUAL_V2)])
    assert (result.status, embedded) == ("unchanged", [])

    edited = [*MANUAL_V2[:-1], "New manual step 11: this step was rewritten."]
    [result] = store.add_documents(ALICE, "kb", [document("manual.txt", edited)])
    assert result.status == "replaced"
    assert len(embedded) == 1 and "rewritten" in embedded[0]
    assert "rewritten" in " ".join(_texts(store, "manual.txt"))


def test_a_batch_is_written_in_one_transaction_of_each_database(tmp_path, monkeypatch):
    store = KnowledgeBaseStore(tmp_path, SMALL_CHUNKS, embedder=HashEmbedder(batch_size=100))
    store.create(ALICE, "kb")
    calls: list[str] = []
    for cls, name in (
        (Registry, "begin_versions"),
        (Registry, "commit_versions"),
        (KeywordIndex, "add_many"),
        (Collection, "add"),
    ):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, _counted(calls, name, original))
    batch = [document(f"doc{i}.txt", [f"Document {i} talks about pump {i}."]) for i in range(3)]
    results = store.add_documents(ALICE, "kb", batch)
    assert [(r.filename, r.status) for r in results] == [
        ("doc0.txt", "added"),
        ("doc1.txt", "added"),
        ("doc2.txt", "added"),
    ]
    assert sorted(calls) == ["add", "add_many", "begin_versions", "commit_versions"]
    assert _stored_chunks(store) == 3 and len(store.documents(ALICE, "kb")) == 3


def _counted(calls: list[str], name: str, original):
    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    return counted


def test_a_document_without_text_is_refused_and_the_others_go_in(tmp_path: Path):
    store = _open(tmp_path)
    store.create(ALICE, "kb")
    batch = [document("a.txt", ["alpha"]), document("empty.txt", []), document("b.txt", ["beta"])]
    with pytest.raises(IngestError, match=r"empty\.txt: refused: no text found"):
        store.add_documents(ALICE, "kb", batch)
    assert store.documents(ALICE, "kb") == []  # refused before anything was written

    refused: list[IngestError] = []
    results = store.add_documents(ALICE, "kb", batch, refused=refused)
    assert [r.filename for r in results] == ["a.txt", "b.txt"]
    assert [e.filename for e in refused] == ["empty.txt"]


def test_a_file_twice_in_one_batch_is_replaced_in_order(tmp_path: Path):
    store = _open(tmp_path)
    store.create(ALICE, "kb")
    batch = [
        document("m.txt", ["first"]),
        document("o.txt", ["other"]),
        document("m.txt", ["second"]),
    ]
    results = store.add_documents(ALICE, "kb", batch)
    assert [r.status for r in results] == ["added", "added", "replaced"]
    assert _texts(store, "m.txt") == ["second"]
    assert _stored_chunks(store) == 2  # the first m.txt's chunk is gone


def test_delete_document_removes_its_chunks(tmp_path: Path):
    store = _kb_with_old_manual(tmp_path)
    store.delete_document(ALICE, "kb", "manual.txt")
    assert [chunk.text for chunk in store.chunks(ALICE, "kb")] == ["x"]
    assert _stored_chunks(store) == 1
    with pytest.raises(KnowledgeBaseError, match=r"no document 'manual.txt'"):
        store.delete_document(ALICE, "kb", "manual.txt")


def test_a_knowledge_base_of_another_model_is_refused(tmp_path: Path):
    _open(tmp_path).create(ALICE, "kb")
    other_model = KnowledgeBaseStore(tmp_path, SMALL_CHUNKS, embedder=HashEmbedder())
    other_model.embedder.name = "another-model"
    with pytest.raises(KnowledgeBaseError, match="built with the embedding model hashed-words"):
        other_model.add_documents(ALICE, "kb", [document("x.txt", ["x"])])


# Crash safety


def _assert_as_before(store: KnowledgeBaseStore, before: list) -> None:
    """Only the old manual and the other file, in the registry, in queries and in Chroma."""
    assert store.documents(ALICE, "kb") == before
    assert _texts(store, "manual.txt") == MANUAL_V1
    assert _stored_chunks(store) == len(MANUAL_V1) + 1


def test_a_failure_before_the_flip_leaves_the_old_document(tmp_path, monkeypatch):
    store = _kb_with_old_manual(tmp_path)
    before = store.documents(ALICE, "kb")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(Registry, "commit_versions", crash)
    with pytest.raises(OSError, match="disk full"):
        store.add_documents(ALICE, "kb", [document("manual.txt", MANUAL_V2)])
    _assert_as_before(store, before)
    assert store._registry.loose_versions() == []


def test_a_failed_batch_leaves_each_of_its_documents_as_before(tmp_path, monkeypatch):
    store = _kb_with_old_manual(tmp_path)
    before = store.documents(ALICE, "kb")
    add = Collection.add
    calls = []

    def add_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # some of the batch's chunks are in Chroma
            raise OSError("disk full")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(Collection, "add", add_then_fail)
    monkeypatch.setattr(store_module, "_CHUNKS_PER_ADD", 2)  # several adds for a small batch
    batch = [document("manual.txt", MANUAL_V2), document("new.txt", ["a new file"] * 3)]
    with pytest.raises(OSError, match="disk full"):
        store.add_documents(ALICE, "kb", batch)
    _assert_as_before(store, before)
    assert store._registry.loose_versions() == []


def test_a_crash_after_the_flip_shows_the_new_document_and_cleanup_ends_it(tmp_path, monkeypatch):
    store = _kb_with_old_manual(tmp_path)

    def crash(*args):
        raise OSError("killed")

    # Dies right after the new version became current, before the old chunks were deleted.
    with monkeypatch.context() as patch:
        patch.setattr(KnowledgeBaseStore, "_drop_versions", crash)
        with pytest.raises(OSError, match="killed"):
            store.add_documents(ALICE, "kb", [document("manual.txt", MANUAL_V2)])
    new_texts = _texts(store, "manual.txt")
    assert "New manual step 0" in new_texts[0] and "old manual" not in " ".join(new_texts)
    assert _stored_chunks(store) == len(new_texts) + 1 + len(MANUAL_V1)  # the old chunks linger

    reopened = _open(tmp_path)
    assert _texts(reopened, "manual.txt") == new_texts
    assert _stored_chunks(reopened) == len(new_texts) + 1


_CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    from chromadb.api.models.Collection import Collection

    from appliance.rag import store as store_module
    from appliance.rag.store import KnowledgeBaseStore
    from tests.unit.rag_corpus import ALICE, MANUAL_V2, SMALL_CHUNKS, HashEmbedder, document

    store = KnowledgeBaseStore(Path(sys.argv[1]), SMALL_CHUNKS, HashEmbedder(batch_size=2))
    add = Collection.add
    calls = []

    def add_then_die(self, *args, **kwargs):
        add(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # some of the new chunks are in Chroma
            os._exit(17)

    Collection.add = add_then_die
    store_module._CHUNKS_PER_ADD = 2  # written in several adds, as a large upload is
    store.add_documents(ALICE, "kb", [document("manual.txt", MANUAL_V2)])
    """
)


def test_a_process_killed_mid_upload_leaves_the_knowledge_base_as_before(tmp_path: Path):
    before = _kb_with_old_manual(tmp_path).documents(ALICE, "kb")
    # A fresh interpreter: embedded Chroma is not shared between processes while one writes.
    chromadb.api.client.SharedSystemClient.clear_system_cache()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=REPO,
        # Whatever else the caller's PYTHONPATH holds (a worktree's overlay) stays after it.
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 17, child.stderr

    half_written = Registry(tmp_path / "registry.sqlite3").loose_versions()
    assert len(half_written) == 1 and not half_written[0].writer_alive()
    collection = half_written[0].collection
    client = chromadb.PersistentClient(
        tmp_path / KBS_DIR / collection / CHROMA_DIR, Settings(anonymized_telemetry=False)
    )
    raw = client.get_collection(collection)
    assert raw.count() == len(MANUAL_V1) + 1 + 4  # two batches of two new chunks were written

    reopened = _open(tmp_path)  # collects the dead upload's chunks
    _assert_as_before(reopened, before)
    assert reopened._registry.loose_versions() == []


def test_a_crash_while_deleting_a_knowledge_base_is_finished_on_reopening(tmp_path, monkeypatch):
    store = _kb_with_old_manual(tmp_path)
    collection = store.get(ALICE, "kb").collection
    with monkeypatch.context() as patch:
        patch.setattr(KnowledgeBaseStore, "_drop_collection", lambda self, name: None)
        store.delete(ALICE, "kb")
    assert (tmp_path / KBS_DIR / collection / CHROMA_DIR / "chroma.sqlite3").exists()
    store.close()
    reopened = _open(tmp_path)
    assert not (tmp_path / KBS_DIR / collection).exists()
    reopened.create(ALICE, "kb")  # the name is free again, and nothing of the old one is back
    assert reopened.documents(ALICE, "kb") == [] and reopened.chunks(ALICE, "kb") == []


def test_a_knowledge_base_each_with_a_bounded_number_of_open_chroma_clients(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_OPEN_CLIENTS", 2)
    store = _open(tmp_path)
    names = [f"kb{i}" for i in range(4)]
    for i, name in enumerate(names):
        store.create(ALICE, name)
        store.add_documents(ALICE, name, [document(f"{name}.txt", [f"pump {i} of {name}"])])
    for name in names * 2:  # each reopened after it was closed
        (found, _), *_ = store.keyword_search(ALICE, name, name, 1)
        assert found.text.endswith(f"of {name}")
        assert [c.text for c in store.chunks(ALICE, name)] == [found.text]
        vector = store.embedder.embed([found.text])[0]
        assert store.search(ALICE, name, vector, 1)[0][0].text == found.text
        assert len(store._clients) <= 2
    collections = sorted(kb.collection for kb in store.knowledge_bases(ALICE))
    assert sorted(p.name for p in (tmp_path / KBS_DIR).iterdir()) == collections
    store.close()
    assert store._clients == {}


def test_the_registry_tells_which_of_many_versions_are_current(tmp_path: Path):
    store = _kb_with_old_manual(tmp_path)
    current = {d.version for d in store.documents(ALICE, "kb")}
    asked = [*(f"gone-{n}" for n in range(2500)), *current]  # over one statement's share
    assert store._registry.current_versions("alice/kb", asked) == current
    assert store._registry.current_versions("alice/other", asked) == set()


def test_an_empty_knowledge_base_answers_no_chunks(tmp_path: Path):
    store = _kb_with_old_manual(tmp_path)
    store.create(ALICE, "empty")
    vector = store.embedder.embed(["old manual"])[0]
    assert store.search(ALICE, "empty", vector, 5) == []
    assert store.keyword_search(ALICE, "empty", "manual", 5) == []
    assert len(store.search(ALICE, "kb", vector, 500)) == len(store.chunks(ALICE, "kb"))
