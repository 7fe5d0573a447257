"""Folder sync in the store: paths checked, the manifest decides, repeated calls change nothing."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from appliance.rag.errors import IngestError, KnowledgeBaseError
from appliance.rag.store import KnowledgeBaseStore
from appliance.rag.sync import check_path, sync

from tests.unit.rag_corpus import ALICE, BOB, SMALL_CHUNKS, HashEmbedder


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> KnowledgeBaseStore:
    store = KnowledgeBaseStore(tmp_path, SMALL_CHUNKS, embedder=HashEmbedder(batch_size=8))
    store.create(ALICE, "kb")
    return store


def test_relative_paths_are_names_and_hostile_ones_are_refused():
    assert check_path("sub/dir/a.txt") == "sub/dir/a.txt"
    assert check_path("cafe\u0301.txt") == "caf\u00e9.txt"  # macOS writes names decomposed
    for bad in ["", "../x", "a/../b", "/etc/passwd", "a//b", "./a", "a\\b", "a\x00b", "bad\udcff"]:
        with pytest.raises(IngestError, match="refused"):
            check_path(bad)
    with pytest.raises(IngestError, match="over 255 bytes"):
        check_path("d/" + "é" * 200)
    with pytest.raises(IngestError, match="1 to 1024 characters"):
        check_path("a/" * 600)


def test_the_manifest_decides_and_a_second_call_changes_nothing(store: KnowledgeBaseStore):
    files = {"a.txt": b"alpha ZQ-1", "sub/a.txt": b"another alpha ZQ-2", "b.txt": b"bravo"}
    manifest = {name: _sha(data) for name, data in files.items()}
    planned = sync(store, ALICE, "kb", manifest, {})
    assert {o.path: o.status for o in planned} == dict.fromkeys(files, "needed")
    done = sync(store, ALICE, "kb", manifest, files)
    assert {o.path: o.status for o in done} == dict.fromkeys(files, "added")
    assert {o.status for o in sync(store, ALICE, "kb", manifest, {})} == {"unchanged"}

    files = {"a.txt": b"alpha ZQ-3", "sub/a.txt": files["sub/a.txt"]}
    manifest = {name: _sha(data) for name, data in files.items()}
    outcomes = sync(store, ALICE, "kb", manifest, {"a.txt": files["a.txt"]})
    assert {o.path: o.status for o in outcomes} == {
        "a.txt": "replaced",
        "b.txt": "removed",
        "sub/a.txt": "unchanged",
    }
    assert sorted(d.filename for d in store.documents(ALICE, "kb")) == ["a.txt", "sub/a.txt"]
    assert [c.filename for c, _ in store.keyword_search(ALICE, "kb", "ZQ-3", 5)] == ["a.txt"]
    assert store.keyword_search(ALICE, "kb", "bravo", 5) == []


def test_content_not_matching_its_hash_or_not_in_the_manifest_is_refused(store):
    manifest = {"a.txt": _sha(b"alpha")}
    outcomes = sync(store, ALICE, "kb", manifest, {"a.txt": b"other", "x.txt": b"x"})
    assert {(o.path, o.status) for o in outcomes} == {("a.txt", "refused"), ("x.txt", "refused")}
    assert store.documents(ALICE, "kb") == []
    with pytest.raises(KnowledgeBaseError, match="not a sha256"):
        sync(store, ALICE, "kb", {"a.txt": "abc"}, {})
    with pytest.raises(KnowledgeBaseError, match="not found"):
        sync(store, BOB, "alice/kb", manifest, {})


def test_an_upload_records_the_hash_and_an_old_registry_gets_the_column(tmp_path: Path):
    store = KnowledgeBaseStore(tmp_path, SMALL_CHUNKS, embedder=HashEmbedder(batch_size=8))
    store.create(ALICE, "kb")
    sync(store, ALICE, "kb", {"a.txt": _sha(b"alpha")}, {"a.txt": b"alpha"})
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:  # back to the form before sync
        db.execute("ALTER TABLE documents DROP COLUMN source_hash")
    reopened = KnowledgeBaseStore(tmp_path, SMALL_CHUNKS, embedder=HashEmbedder(batch_size=8))
    [document] = reopened.documents(ALICE, "kb")
    assert document.source_hash is None
    # Sent once more: the chunks are the same, so nothing is embedded, but the hash is kept.
    [outcome] = sync(reopened, ALICE, "kb", {"a.txt": _sha(b"alpha")}, {"a.txt": b"alpha"})
    assert outcome.status == "unchanged"
    assert reopened.documents(ALICE, "kb")[0].source_hash == _sha(b"alpha")
