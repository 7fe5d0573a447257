"""Moving knowledge bases from the shared layout (schema 2: one embedded Chroma for all in
`<rag root>/chroma/`, keyword indexes in `<rag root>/keywords/`) into a directory each
(rag/kb_dirs.py). Every step can run again: vectors are upserted under their ids, a keyword
index is copied whole before its old file goes, and the shared Chroma is deleted last."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

from appliance.rag.kb_dirs import KnowledgeBaseDirs
from appliance.rag.keywords import KeywordIndex
from appliance.rag.registry import Registry
from appliance.rag.store import CHROMA_DIR, KEYWORDS_FILE, embedded_chroma

log = logging.getLogger(__name__)

SHARED_CHROMA_DIR = "chroma"
SHARED_KEYWORDS_DIR = "keywords"
# Records per read and per write (Chroma refuses more than ~5000 in one add).
_PAGE = 1000


def move_to_kb_dirs(root: Path, dirs: KnowledgeBaseDirs, *, embedded: bool) -> list[str]:
    """Move every knowledge base of the registry in `root` into its directory; returns the
    collections moved. `embedded`: vectors are in the shared embedded Chroma (not on a server,
    where they stay)."""
    registry = root / "registry.sqlite3"
    if not registry.exists():
        return []
    shared = root / SHARED_CHROMA_DIR
    source = embedded_chroma(shared) if embedded and shared.is_dir() else None
    moved = []
    try:
        for kb in Registry(registry).knowledge_bases():
            path = dirs.open(kb.collection, create=True)
            assert path is not None
            try:
                if source is not None:
                    _copy_vectors(source, kb.collection, path / CHROMA_DIR)
                _move_keywords(root / SHARED_KEYWORDS_DIR / f"{kb.collection}.sqlite3", path)
            finally:
                dirs.close(kb.collection)
            moved.append(kb.collection)
    finally:
        if source is not None:
            source.close()
    # Last: until here, a run again starts from the shared copies.
    shutil.rmtree(shared, ignore_errors=True)
    shutil.rmtree(root / SHARED_KEYWORDS_DIR, ignore_errors=True)
    return moved


def _copy_vectors(source, collection: str, target_dir: Path) -> None:
    from chromadb.errors import NotFoundError

    try:
        old = source.get_collection(collection, embedding_function=None)
    except NotFoundError:
        return  # made on first use, as the store always did
    target = embedded_chroma(target_dir)
    try:
        new = target.get_or_create_collection(
            collection, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
        )
        total = old.count()
        log.info("moving %d chunks of collection %s", total, collection)
        for offset in range(0, total, _PAGE):
            page = old.get(
                limit=_PAGE, offset=offset, include=["embeddings", "documents", "metadatas"]
            )
            if page["ids"]:
                new.upsert(
                    ids=page["ids"],
                    embeddings=page["embeddings"],
                    documents=page["documents"],
                    metadatas=page["metadatas"],
                )
        if new.count() != total:
            raise RuntimeError(
                f"collection {collection}: {new.count()} chunks moved of {total}: run again"
            )
    finally:
        target.close()


def _move_keywords(old: Path, kb_dir: Path) -> None:
    """Copy with SQLite's backup API (what its write-ahead log holds included), then delete the
    old file; one not there was moved already, or never built (the store builds it)."""
    if not old.exists():
        return
    new = kb_dir / KEYWORDS_FILE
    with closing(sqlite3.connect(old)) as src, closing(sqlite3.connect(new)) as dst:
        src.backup(dst)
    KeywordIndex(old).delete()
