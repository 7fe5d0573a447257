"""The keyword index (SQLite FTS5) beside Chroma: in step through SIGKILLs, built when missing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from contextlib import closing
from pathlib import Path

import chromadb
import pytest
from appliance.rag import keywords
from appliance.rag.chunking import Chunk
from appliance.rag.keywords import KeywordIndex
from appliance.rag.sqlite_db import ConnectionPool
from appliance.rag.store import KEYWORDS_FILE, KnowledgeBaseStore

from tests.unit.rag_corpus import ALICE, MANUAL_V1, document
from tests.unit.test_rag_store import _kb_with_old_manual, _open

REPO = Path(__file__).resolve().parents[2]


def _index_file(store: KnowledgeBaseStore) -> Path:
    return store.dirs.path(store.get(ALICE, "kb").collection) / KEYWORDS_FILE


def _index_rows(store: KnowledgeBaseStore) -> int:
    """Rows in the knowledge base's keyword index, current or not."""
    with sqlite3.connect(_index_file(store)) as db:
        return db.execute("SELECT count(*) FROM chunks").fetchone()[0]


def _found(store: KnowledgeBaseStore, query: str) -> list[str]:
    return [chunk.text for chunk, _ in store.keyword_search(ALICE, "kb", query, 50)]


def _vectors(store: KnowledgeBaseStore) -> int:
    return store._collection(store.get(ALICE, "kb")).count()


# The child dies by SIGKILL at one point of an upload that replaces manual.txt with MANUAL_V2.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    from appliance.rag.keywords import KeywordIndex
    from appliance.rag.registry import Registry
    from appliance.rag.store import KnowledgeBaseStore
    from tests.unit.rag_corpus import ALICE, MANUAL_V2, SMALL_CHUNKS, HashEmbedder, document

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(cls, name):
        original = getattr(cls, name)
        setattr(cls, name, lambda *args: (original(*args), die()))

    def before(cls, name):
        setattr(cls, name, lambda *args: die())

    point = sys.argv[2]
    if point == "indexed":  # keyword rows written, no vector yet
        after(KeywordIndex, "add_many")
    elif point == "embedded":  # keyword rows and vectors written, the registry not flipped
        before(Registry, "commit_versions")
    elif point == "flipped":  # the new version current, the old one's rows not deleted
        after(Registry, "commit_versions")
    store = KnowledgeBaseStore(Path(sys.argv[1]), SMALL_CHUNKS, HashEmbedder(batch_size=2))
    store.add_documents(ALICE, "kb", [document("manual.txt", MANUAL_V2)])
    """
)


def _kill_child_at(root: Path, point: str) -> None:
    # A fresh interpreter: embedded Chroma is not shared between processes while one writes.
    chromadb.api.client.SharedSystemClient.clear_system_cache()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), point],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr


@pytest.mark.parametrize("point", ["indexed", "embedded"])
def test_a_process_killed_before_the_flip_leaves_the_old_document_in_both(
    tmp_path: Path, point: str
):
    before = _kb_with_old_manual(tmp_path).documents(ALICE, "kb")
    _kill_child_at(tmp_path, point)

    reopened = _open(tmp_path)
    assert reopened.documents(ALICE, "kb") == before
    assert _found(reopened, "torque flange") == MANUAL_V1
    assert _found(reopened, "procedure shift") == []
    assert _index_rows(reopened) == _vectors(reopened) == len(MANUAL_V1) + 1
    assert reopened._registry.loose_versions() == []


def test_a_process_killed_after_the_flip_leaves_the_new_document_in_both(tmp_path: Path):
    _kb_with_old_manual(tmp_path)
    _kill_child_at(tmp_path, "flipped")

    reopened = _open(tmp_path)
    assert _found(reopened, "torque flange") == []
    new = [c.text for c in reopened.chunks(ALICE, "kb") if c.filename == "manual.txt"]
    assert "New manual step 11" in new[-1] and sorted(_found(reopened, "procedure")) == sorted(new)
    assert _index_rows(reopened) == _vectors(reopened) == len(new) + 1
    assert reopened._registry.loose_versions() == []


def test_changes_reach_the_index_document_by_document(tmp_path: Path):
    store = _kb_with_old_manual(tmp_path)
    store.add_documents(
        ALICE, "kb", [document("manual.txt", [f"Step {i}: procedure {i}." for i in range(12)])]
    )
    new = [c.text for c in store.chunks(ALICE, "kb") if c.filename == "manual.txt"]
    assert _found(store, "torque") == [] and sorted(_found(store, "procedure")) == sorted(new)
    assert _index_rows(store) == len(new) + 1
    store.delete_document(ALICE, "kb", "manual.txt")
    assert _found(store, "procedure") == [] and _index_rows(store) == 1
    index = _index_file(store)
    store.delete(ALICE, "kb")
    assert not index.exists()


def _as_written_before_the_index(store: KnowledgeBaseStore) -> Path:
    """Remove the keyword index and give Chroma the chunks' text, as stores were before there
    was an index; the index's path."""
    chunks = store.chunks(ALICE, "kb")
    collection = store._collection(store.get(ALICE, "kb"))
    got = collection.get(ids=[c.id for c in chunks], include=["embeddings", "metadatas"])
    by_id = {c.id: c for c in chunks}
    where = [(by_id[i].document_id, by_id[i].filename, by_id[i].index) for i in got["ids"]]
    collection.update(
        ids=got["ids"],
        embeddings=got["embeddings"],
        documents=[by_id[i].text for i in got["ids"]],
        metadatas=[
            {**meta, "document_id": document, "filename": filename, "index": index}
            for meta, (document, filename, index) in zip(got["metadatas"], where, strict=True)
        ],
    )
    index = _index_file(store)
    index.unlink()
    return index


def test_a_knowledge_base_without_an_index_gets_one_built_once_on_opening(tmp_path: Path):
    index = _as_written_before_the_index(_kb_with_old_manual(tmp_path))
    reopened = _open(tmp_path)
    assert index.exists() and _found(reopened, "torque flange") == MANUAL_V1
    [chunk] = [c for c, _ in reopened.keyword_search(ALICE, "kb", "torque", 5)]
    assert chunk in reopened.chunks(ALICE, "kb")  # ids and sources as Chroma has them
    assert reopened.build_missing_keyword_indexes() == []  # idempotent: a migration step
    index.unlink()
    assert reopened.build_missing_keyword_indexes() == ["alice/kb"]
    assert _index_rows(reopened) == len(MANUAL_V1) + 1


def test_a_lost_index_is_reported_not_built_without_text(tmp_path: Path, caplog):
    store = _kb_with_old_manual(tmp_path)
    assert store._collection(store.get(ALICE, "kb")).get(include=["documents"])["documents"] == [
        None
    ] * (len(MANUAL_V1) + 1)  # the text is in the keyword index only
    index = _index_file(store)
    index.unlink()
    reopened = _open(tmp_path)
    assert not index.exists()  # not an index of empty texts that would pass for whole
    assert "alice/kb: its keyword index is missing" in caplog.text
    assert reopened.build_missing_keyword_indexes() == []


def test_common_words_are_left_out_of_the_candidates(tmp_path: Path, monkeypatch):
    index = KeywordIndex(tmp_path / "kb.sqlite3")
    index.create()
    texts = ["pump valve XK-4471", "pump valve seal", "pump valve", "pump bearing", "pump", "seal"]
    chunks = [Chunk("", text, "f.txt", n, None, None, None) for n, text in enumerate(texts)]
    index.add_many(("v", "d", chunk) for chunk in chunks)

    def found(query: str) -> list[str]:
        return [c.text for c, _ in index.search("kb", query, 10, lambda versions: versions & {"v"})]

    assert found("pump valve seal 4471")[0] == "pump valve XK-4471"
    assert "seal" in found("pump valve seal 4471")  # ranked by every word under the bound
    # At most two chunks ranked in full: the rarest word's, then ranked by all the words.
    monkeypatch.setattr(keywords, "CANDIDATE_POSTINGS", 2)
    assert found("valve seal 4471") == ["pump valve XK-4471"]
    assert found("pump") == []  # in five chunks of six, and more chunks than the bound


def _index(path: Path, texts: list[str]) -> KeywordIndex:
    index = KeywordIndex(path)
    index.create()
    index.add_many(
        ("v", "d", Chunk("", text, "f.txt", n, None, None, None)) for n, text in enumerate(texts)
    )
    return index


def test_candidates_found_by_the_rarest_words_are_scored_by_fts5_bm25_of_all(
    tmp_path: Path, monkeypatch
):
    texts = [
        "pump valve seal Überdruck",
        "pump pump bearing grease seal",
        "seal oil pump valve valve",
        "bread",
        "water pump Überdruck seal valve",
        "a b c",
        "d e f g",
        "h",
        "i j",
        "k l m",
        "n",
    ]
    index = _index(tmp_path / "kb.sqlite3", texts)
    query = "pump valve seal überdruck"
    every = keywords.match_expression(["pump", "valve", "seal", "uberdruck"])
    with sqlite3.connect(index.path) as db:
        fts5 = dict(
            db.execute(
                "SELECT chunks.text, -bm25(terms) FROM terms JOIN chunks"
                " ON chunks.rowid = terms.rowid WHERE terms MATCH ?",
                (every,),
            ).fetchall()
        )
    # Candidates: the chunks of the rarest word (überdruck, 2), then rescored by every word.
    monkeypatch.setattr(keywords, "CANDIDATE_POSTINGS", 2)
    found = index.search("kb", query, 10, lambda versions: versions)
    assert [c.text for c, _ in found] == sorted(
        ["pump valve seal Überdruck", "water pump Überdruck seal valve"], key=lambda t: -fts5[t]
    )
    assert all(score == pytest.approx(fts5[chunk.text], rel=1e-9) for chunk, score in found)
    # Without the bound, FTS5 ranks every chunk with a word itself: the same scores.
    monkeypatch.setattr(keywords, "CANDIDATE_POSTINGS", 10_000)
    found = index.search("kb", query, 10, lambda versions: versions)
    assert {c.text: s for c, s in found} == pytest.approx(fts5, rel=1e-9)


def test_word_counts_are_remembered_within_a_bound_and_counted_again_as_the_index_grows(
    tmp_path: Path,
):
    index = _index(tmp_path / "kb.sqlite3", [f"pump {n}" for n in range(20)])
    counts = keywords._WordCounts(limit=3)
    with closing(index._connect()) as db:
        assert counts.get(db, index.path, 20, ["pump", "1", "absent"]) == {
            "pump": 20,
            "1": 1,
            "absent": 0,
        }
        index.add_many([("w", "e", Chunk("", "pump", "g.txt", 0, None, None, None))])
        # Within COUNT_STALE of the size it was counted at: remembered, not counted again.
        assert counts.get(db, index.path, 21, ["pump"]) == {"pump": 20}
        assert counts.get(db, index.path, 23, ["pump"]) == {"pump": 21}
        counts.get(db, index.path, 23, ["2", "3", "4"])
        assert len(counts._counts) == 3  # the least recently used went first
        assert (str(index.path), "pump") not in counts._counts


def test_the_varint_reader_reads_sqlite_varints():
    assert keywords._varint(bytes([0x05]), 0) == (5, 1)
    assert keywords._varint(bytes([0x81, 0x00, 0x07]), 0) == (128, 2)
    assert keywords._varint(bytes([0xFF] * 8 + [0xAB]), 0) == (2**64 - 1 - 0xFF + 0xAB, 9)


def _open_files(under: Path) -> list[str]:
    """The files under `under` that this process has open (its /proc/self/fd links)."""
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
        if target.startswith(f"{under}/"):
            found.append(target)
    return found


def test_threads_query_and_write_on_kept_connections_closed_by_close(tmp_path: Path):
    index = _index(tmp_path / "kb.sqlite3", ["pump valve"])
    errors: list[BaseException] = []
    stop = threading.Event()

    def query() -> None:
        try:
            while not stop.is_set():
                found = index.search("kb", "pump valve", 10, lambda seen: seen)
                assert found and found[0][0].text.startswith("pump")
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=query) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for n in range(30):
            chunk = Chunk("", f"pump valve {n}", "f.txt", 0, None, None, None)
            index.add_many([(f"w{n}", "e", chunk)])
            if n % 3 == 0:
                index.drop([f"w{n}"])
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=30)
    assert not errors and not any(reader.is_alive() for reader in readers)
    assert _open_files(tmp_path)  # kept for the next query
    index.close()
    assert _open_files(tmp_path) == []
    # Used again after close: connections open again.
    assert len(index.search("kb", "pump", 50, lambda seen: seen)) == 21


def test_a_connection_in_use_at_close_is_closed_when_its_call_ends(tmp_path: Path):
    pool = ConnectionPool(lambda: sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None))
    with pool.connection() as idle:
        pass
    with pool.connection() as busy:
        assert busy is idle  # kept, and given again
        pool.close()
        assert busy.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(sqlite3.ProgrammingError):
        busy.execute("SELECT 1")
    with pool.transaction() as fresh:
        assert fresh is not busy
        fresh.execute("CREATE TABLE t (x)")
    with pytest.raises(ZeroDivisionError), pool.transaction() as db:
        db.execute("INSERT INTO t VALUES (1)")
        raise ZeroDivisionError
    with pool.connection() as db:
        assert db is not fresh  # given up after an error
        assert db.execute("SELECT count(*) FROM t").fetchone() == (0,)
    pool.close()


def test_a_deleted_or_closed_knowledge_base_leaves_no_file_open(tmp_path: Path):
    store = _kb_with_old_manual(tmp_path)
    store.create(ALICE, "other")
    store.add_documents(ALICE, "other", [document("a.txt", ["flange bolts"])])
    for name in ("kb", "other"):
        assert store.keyword_search(ALICE, name, "flange bolts", 5)
    kept = store.dirs.path(store.get(ALICE, "kb").collection)
    gone = store.dirs.path(store.get(ALICE, "other").collection)
    assert any(path.endswith(KEYWORDS_FILE) for path in _open_files(gone))
    store.delete(ALICE, "other")
    assert _open_files(gone) == [] and not gone.exists()
    assert any(path.endswith(KEYWORDS_FILE) for path in _open_files(kept))
    store.close()
    assert [path for path in _open_files(tmp_path) if "sqlite3" in path] == []
    # The store opens them again.
    assert _found(store, "flange bolts") == MANUAL_V1
