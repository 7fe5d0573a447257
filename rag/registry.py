"""The record of knowledge bases: owners, access, and the current version of each document.

It is a SQLite database next to Chroma's data. Chroma holds chunks; this registry decides which of
them count. A document's new chunks are written under a new version id and become visible in one
SQLite transaction, so a crash leaves either the old version or the new one, never a mix.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from appliance.rag.access import KnowledgeBaseACL
from appliance.rag.errors import KnowledgeBaseError
from appliance.rag.sqlite_db import ConnectionPool

_SCHEMA = """
-- Facts about this registry; `store_id` marks the Chroma collections that belong to it.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- `name` is the knowledge base's id, `owner/name`: each user has a namespace of names.
CREATE TABLE IF NOT EXISTS knowledge_bases (
    name TEXT PRIMARY KEY,
    collection TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    readers TEXT NOT NULL,
    groups TEXT NOT NULL,
    created_at TEXT NOT NULL,
    embedding_model TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS documents (
    kb TEXT NOT NULL REFERENCES knowledge_bases (name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    filename TEXT NOT NULL,
    version TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    -- sha256 of the file as uploaded: what folder sync compares (NULL: uploaded before).
    source_hash TEXT,
    PRIMARY KEY (kb, id)
);
-- Queries ask which versions of the chunks they found are current: an index lookup each, so a
-- query costs the same whatever the number of documents, and just after an upload too.
CREATE INDEX IF NOT EXISTS documents_version ON documents (kb, version);
-- Versions whose chunks may be in Chroma while no document points to them: being written (the
-- writing process is named, with its start time against pid reuse), or replaced, deleted or
-- abandoned (no writer) and waiting for their chunks to be deleted.
CREATE TABLE IF NOT EXISTS loose_versions (
    collection TEXT NOT NULL,
    version TEXT NOT NULL,
    writer_pid INTEGER,
    writer_started REAL,
    PRIMARY KEY (collection, version)
);
"""

# SQLite takes at most 32,766 parameters a statement.
_VERSIONS_PER_QUERY = 1000
_DOCUMENT_COLUMNS = "id, filename, version, content_hash, chunks, updated_at, source_hash"
# Set in `meta` once the names of knowledge bases are ids `owner/name`: registries written
# before (one global namespace of names) are migrated when opened.
_NAMESPACED = "namespaced_names"


@dataclass(frozen=True)
class KnowledgeBase:
    """A knowledge base as registered: its Chroma collection, access and embedding model."""

    id: str
    """`owner/name`: names are unique per owner, ids across the registry."""
    collection: str
    acl: KnowledgeBaseACL
    created_at: str
    embedding_model: str
    dimension: int
    generation: int = 0
    """Counts changes to its documents, so caches built from its chunks know when they are old."""

    @property
    def name(self) -> str:
        """The name its owner gave it, unique among the owner's knowledge bases."""
        return self.id.split("/", 1)[1]


@dataclass(frozen=True)
class DocumentRecord:
    """A document of a knowledge base and the version of its chunks that queries see."""

    id: str
    filename: str
    version: str
    content_hash: str
    chunks: int
    updated_at: str
    source_hash: str | None = None
    """sha256 of the uploaded file; None for documents uploaded before it was kept."""


@dataclass(frozen=True)
class LooseVersion:
    """Chunks of a version no document points to; deletable once no live process writes them."""

    collection: str
    version: str
    writer_pid: int | None
    writer_started: float | None

    def writer_alive(self) -> bool:
        if self.writer_pid is None:
            return False
        try:
            return psutil.Process(self.writer_pid).create_time() == self.writer_started
        except psutil.Error:
            return False


class Registry:
    """Knowledge bases and document versions in SQLite; every change is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connections = ConnectionPool(self._connect)
        with self._connections.connection() as db:
            db.executescript(_SCHEMA)
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (secrets.token_hex(4),))
            (self.store_id,) = db.execute(
                "SELECT value FROM meta WHERE key = 'store_id'"
            ).fetchone()
            if not db.execute("SELECT 1 FROM meta WHERE key = ?", (_NAMESPACED,)).fetchone():
                _namespace_names(db)
            add_source_hashes(db)

    def knowledge_base(self, kb_id: str) -> KnowledgeBase | None:
        with self._connections.connection() as db:
            row = db.execute("SELECT * FROM knowledge_bases WHERE name = ?", (kb_id,)).fetchone()
        return _knowledge_base(row) if row else None

    def knowledge_bases_named(self, name: str) -> list[KnowledgeBase]:
        """The knowledge bases of any owner called `name`, by id."""
        with self._connections.connection() as db:
            rows = db.execute(
                "SELECT * FROM knowledge_bases WHERE substr(name, instr(name, '/') + 1) = ?"
                " ORDER BY name",
                (name,),
            ).fetchall()
        return [_knowledge_base(row) for row in rows]

    def knowledge_bases(self) -> list[KnowledgeBase]:
        with self._connections.connection() as db:
            rows = db.execute("SELECT * FROM knowledge_bases ORDER BY name").fetchall()
        return [_knowledge_base(row) for row in rows]

    def add_knowledge_base(self, kb: KnowledgeBase) -> None:
        """Register `kb`; raises KnowledgeBaseError when its owner has one of that name."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO knowledge_bases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        kb.id,
                        kb.collection,
                        kb.acl.owner,
                        json.dumps(sorted(kb.acl.readers)),
                        json.dumps(sorted(kb.acl.groups)),
                        kb.created_at,
                        kb.embedding_model,
                        kb.dimension,
                        kb.generation,
                    ),
                )
        except sqlite3.IntegrityError:
            message = f"you already have a knowledge base named {kb.name!r}"
            raise KnowledgeBaseError(message) from None

    def set_access(self, kb_id: str, readers: frozenset[str], groups: frozenset[str]) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE knowledge_bases SET readers = ?, groups = ? WHERE name = ?",
                (json.dumps(sorted(readers)), json.dumps(sorted(groups)), kb_id),
            )

    def remove_knowledge_base(self, kb_id: str) -> None:
        """Forget the knowledge base and its documents; its collection is the caller's to drop."""
        with self._transaction() as db:
            row = db.execute(
                "DELETE FROM knowledge_bases WHERE name = ? RETURNING collection", (kb_id,)
            ).fetchone()
            if row:
                db.execute("DELETE FROM loose_versions WHERE collection = ?", row)

    def documents(self, kb_id: str) -> list[DocumentRecord]:
        with self._connections.connection() as db:
            rows = db.execute(
                f"SELECT {_DOCUMENT_COLUMNS} FROM documents WHERE kb = ? ORDER BY filename",
                (kb_id,),
            ).fetchall()
        return [DocumentRecord(*row) for row in rows]

    def current_versions(self, kb_id: str, versions: Collection[str]) -> set[str]:
        """Those of `versions` that are the current version of a document of the knowledge base."""
        listed = list(versions)
        current: set[str] = set()
        with self._connections.connection() as db:
            for start in range(0, len(listed), _VERSIONS_PER_QUERY):
                part = listed[start : start + _VERSIONS_PER_QUERY]
                rows = db.execute(
                    "SELECT version FROM documents WHERE kb = ? AND version IN"
                    f" ({', '.join('?' * len(part))})",
                    (kb_id, *part),
                )
                current.update(version for (version,) in rows)
        return current

    def document(self, kb_id: str, document_id: str) -> DocumentRecord | None:
        with self._connections.connection() as db:
            row = db.execute(
                f"SELECT {_DOCUMENT_COLUMNS} FROM documents WHERE kb = ? AND id = ?",
                (kb_id, document_id),
            ).fetchone()
        return DocumentRecord(*row) if row else None

    def set_source_hash(self, kb_id: str, document_id: str, source_hash: str) -> None:
        """Record the file hash of a document whose upload changed none of its chunks."""
        with self._transaction() as db:
            db.execute(
                "UPDATE documents SET source_hash = ? WHERE kb = ? AND id = ?",
                (source_hash, kb_id, document_id),
            )

    def begin_versions(self, collection: str, versions: Sequence[str]) -> None:
        """Note, before any of their chunks is written, that this process writes `versions`."""
        me = psutil.Process()
        writer = (me.pid, me.create_time())
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO loose_versions VALUES (?, ?, ?, ?)",
                [(collection, version, *writer) for version in versions],
            )

    def commit_versions(
        self, kb: KnowledgeBase, documents: Sequence[DocumentRecord]
    ) -> list[DocumentRecord | None]:
        """Make each `document.version` its document's current version, all in one transaction.

        Returns, for each, the version it replaces (now loose, its chunks to be deleted), if any.
        Raises KnowledgeBaseError, changing nothing, when the knowledge base was deleted or a
        version was given up while it was being written.
        """
        with self._transaction() as db:
            if not _exists(db, kb):
                raise KnowledgeBaseError(f"knowledge base {kb.id!r} was deleted meanwhile")
            previous = []
            for document in documents:
                claimed = db.execute(
                    "DELETE FROM loose_versions WHERE collection = ? AND version = ?",
                    (kb.collection, document.version),
                ).rowcount
                if not claimed:  # the transaction rolls back what the loop did before
                    raise KnowledgeBaseError(
                        f"{document.filename}: its new chunks were cleaned up while being written"
                    )
                previous.append(self._replace(db, kb, document.id, document))
            return previous

    def remove_document(self, kb: KnowledgeBase, document_id: str) -> DocumentRecord | None:
        """Forget the document; returns it (its version now loose), or None if there was none."""
        with self._transaction() as db:
            return self._replace(db, kb, document_id, None)

    def abandon_versions(self, collection: str, versions: Sequence[str]) -> None:
        """Mark versions whose writing failed as free to clean up by anyone."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE loose_versions SET writer_pid = NULL, writer_started = NULL"
                " WHERE collection = ? AND version = ?",
                [(collection, version) for version in versions],
            )

    def loose_versions(self) -> list[LooseVersion]:
        with self._connections.connection() as db:
            rows = db.execute("SELECT * FROM loose_versions").fetchall()
        return [LooseVersion(*row) for row in rows]

    def forget_versions(self, collection: str, versions: Sequence[str]) -> None:
        """Drop the notes of loose versions whose chunks are deleted."""
        with self._transaction() as db:
            db.executemany(
                "DELETE FROM loose_versions WHERE collection = ? AND version = ?",
                [(collection, version) for version in versions],
            )

    @staticmethod
    def _replace(
        db: sqlite3.Connection, kb: KnowledgeBase, document_id: str, new: DocumentRecord | None
    ) -> DocumentRecord | None:
        """Put `new` (or nothing) in the document's place and mark the old version loose."""
        row = db.execute(
            f"SELECT {_DOCUMENT_COLUMNS} FROM documents WHERE kb = ? AND id = ?",
            (kb.id, document_id),
        ).fetchone()
        previous = DocumentRecord(*row) if row else None
        if previous:
            db.execute(
                "INSERT OR IGNORE INTO loose_versions VALUES (?, ?, NULL, NULL)",
                (kb.collection, previous.version),
            )
        if new:
            db.execute(
                f"INSERT OR REPLACE INTO documents (kb, {_DOCUMENT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (kb.id, *astuple(new)),
            )
        elif previous:
            db.execute("DELETE FROM documents WHERE kb = ? AND id = ?", (kb.id, document_id))
        else:
            return None
        db.execute(
            "UPDATE knowledge_bases SET generation = generation + 1 WHERE name = ?", (kb.id,)
        )
        return previous

    def close(self) -> None:
        """Close its database connections (opened again if used after)."""
        self._connections.close()

    def _transaction(self):
        return self._connections.transaction()

    def _connect(self) -> sqlite3.Connection:
        # Kept open in the pool, each used by one thread at a time; other processes' writes are
        # seen at each read as with a new connection. autocommit (isolation_level=None) so
        # transactions are exactly the BEGIN/COMMIT above.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed version flip survives a power cut, not only a process crash.
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        return db


def now() -> str:
    """The current time as an ISO 8601 UTC string, as registry timestamps are kept."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _exists(db: sqlite3.Connection, kb: KnowledgeBase) -> bool:
    row = db.execute(
        "SELECT 1 FROM knowledge_bases WHERE name = ? AND collection = ?",
        (kb.id, kb.collection),
    ).fetchone()
    return row is not None


def _knowledge_base(row: tuple) -> KnowledgeBase:
    kb_id, collection, owner, readers, groups, created_at, model, dimension, generation = row
    acl = KnowledgeBaseACL(owner, frozenset(json.loads(readers)), frozenset(json.loads(groups)))
    return KnowledgeBase(kb_id, collection, acl, created_at, model, dimension, generation)


def _namespace_names(db: sqlite3.Connection) -> None:
    """Turn the names of a registry from before namespaces into ids `owner/name`, documents'
    references included, in the caller's transaction."""
    # The documents' references and the names change in two statements: the foreign key is
    # checked at commit, when both are done.
    db.execute("PRAGMA defer_foreign_keys = ON")
    db.execute(
        "UPDATE documents SET kb = (SELECT owner || '/' || name FROM knowledge_bases"
        " WHERE knowledge_bases.name = documents.kb) WHERE instr(kb, '/') = 0"
    )
    db.execute("UPDATE knowledge_bases SET name = owner || '/' || name WHERE instr(name, '/') = 0")
    db.execute("INSERT INTO meta VALUES (?, '1')", (_NAMESPACED,))


def add_source_hashes(db: sqlite3.Connection) -> None:
    """Give a registry from before folder sync its documents' `source_hash` column (NULL: such a
    document is sent once by the next sync, then skipped while unchanged); a migration step."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(documents)")}
    if "source_hash" not in columns:
        db.execute("ALTER TABLE documents ADD COLUMN source_hash TEXT")
