"""Knowledge bases in Chroma and FTS5: one collection and one keyword index each, crash-safe
document updates, access checks.

Each knowledge base has a directory of its own (rag/kb_dirs.py: plain,
`<rag root>/kbs/<collection>/`, or an encrypted volume of its own, mounted outside the rag
root): its embedded Chroma in `chroma/` and its keyword index in `keywords.sqlite3`, so
deleting it deletes every file that held its text. The keyword index keeps the chunks' text and
where each came from; Chroma, their vectors and the metadata that filters them (stores from
before the keyword index have the text in Chroma too, from which a missing index is built). With
`rag.chroma_url` the vectors live on that Chroma server (its storage is the operator's to
encrypt) and only the keyword index is in the directory. The registry, `registry.sqlite3`, is in
the rag root.

Every chunk carries the version id of the document upload it came from, in Chroma and in the
keyword index alike; the registry names each document's current version. An upload writes its
chunks under a new version to both, flips the current version in one registry transaction, then
deletes the old version's chunks from both. Reads keep only chunks of current versions, so a
document is in both or in neither, also after a crash; `collect_garbage` deletes what an
interrupted upload left.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from appliance.rag.access import KnowledgeBaseACL, Principal, require_read, require_write
from appliance.rag.chunking import Chunk, chunk_document
from appliance.rag.document import ParsedDocument
from appliance.rag.embeddings import Embedder
from appliance.rag.errors import IngestError, KnowledgeBaseError
from appliance.rag.kb_dirs import KnowledgeBaseDirs
from appliance.rag.keywords import KeywordIndex
from appliance.rag.registry import DocumentRecord, KnowledgeBase, Registry, now
from appliance.rag.write_lock import write_lock

from appliance.config.rag import RagSettings

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

log = logging.getLogger(__name__)

# Starts with a letter or digit: no `.` or `..`, nothing that reads as a hidden file or option.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ._-]{0,62}[A-Za-z0-9._-])?")
_MAX_ACCESS_NAMES = 1000
# Versions per Chroma `$in` filter, and chunks per `add` (Chroma refuses more than ~5000).
_VERSIONS_PER_GET = 100
_CHUNKS_PER_ADD = 1000
# In each knowledge base's directory: its embedded Chroma, and its keyword index.
CHROMA_DIR = "chroma"
KEYWORDS_FILE = "keywords.sqlite3"
# Embedded Chroma clients kept open at once: each holds ~7 threads and ~4 MiB (measured with
# Chroma 1.5.9), and reopening one costs ~25 ms. As many keyword indexes keep their connections.
MAX_OPEN_CLIENTS = 32


@dataclass(frozen=True)
class _Planned:
    """A document's new version, chunked and not yet written; `old`, the version it replaces."""

    record: DocumentRecord
    chunks: list[Chunk]
    old: DocumentRecord | None = None


def _without_repeats(planned: list[_Planned]) -> Iterator[list[_Planned]]:
    """Consecutive groups with no document twice: a file uploaded twice in one batch replaces
    itself in order, as uploads one after the other would."""
    group: list[_Planned] = []
    ids: set[str] = set()
    for item in planned:
        if item.record.id in ids:
            yield group
            group, ids = [], set()
        group.append(item)
        ids.add(item.record.id)
    if group:
        yield group


@dataclass(frozen=True)
class IngestResult:
    """What adding one document did, and how many chunks it has now."""

    filename: str
    document_id: str
    status: Literal["added", "replaced", "unchanged"]
    chunks: int


def document_id(filename: str) -> str:
    """The id of a document in its knowledge base: the same file name is the same document."""
    return hashlib.sha256(filename.encode()).hexdigest()[:32]


class KnowledgeBaseStore:
    """Knowledge bases and their documents, checked against the principal's access on every call.

    Each user names knowledge bases in a namespace of their own. A knowledge base is referred to
    by its id, `owner/name`, or by its name alone: the principal's own knowledge base of that
    name, else the one knowledge base of that name the principal may read.
    """

    def __init__(
        self,
        root: Path,
        settings: RagSettings | None = None,
        embedder: Embedder | None = None,
        dirs: KnowledgeBaseDirs | None = None,
    ) -> None:
        """Open (or start) the store whose registry, and knowledge bases' directories, are in
        `root`; `dirs` makes those directories (default: plain ones)."""
        self.settings = settings or RagSettings()
        self.embedder = embedder or Embedder.from_settings(self.settings)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.dirs = dirs or KnowledgeBaseDirs(root)
        self._registry = Registry(root / "registry.sqlite3")
        # Embedded Chroma: one client per knowledge base, opened at its first use. A server:
        # one client for all.
        self._server = _chroma_server(self.settings)
        self._clients: dict[str, ClientAPI] = {}  # least recently used first
        self._users: Counter[str] = Counter()
        self._clients_lock = threading.Lock()
        # Keyword indexes with their connections kept open, least recently used first.
        self._indexes: OrderedDict[str, KeywordIndex] = OrderedDict()
        self._indexes_lock = threading.Lock()
        self.collect_garbage()
        self.build_missing_keyword_indexes()

    def close(self) -> None:
        """Close every knowledge base's Chroma client and keyword index, and the registry, and
        give back their directories (an encrypted one is unmounted). The store opens them again
        if used after."""
        with self._clients_lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()
        with self._indexes_lock:
            indexes, self._indexes = self._indexes, OrderedDict()
        for index in indexes.values():
            index.close()
        self._registry.close()
        self.dirs.close_all()

    # Knowledge bases

    def create(
        self,
        principal: Principal,
        name: str,
        readers: Iterable[str] = (),
        groups: Iterable[str] = (),
    ) -> KnowledgeBase:
        """A new, empty knowledge base owned by the principal, in the principal's namespace."""
        if not _NAME.fullmatch(name):
            raise KnowledgeBaseError(
                f"invalid knowledge base name {name!r}: use 1 to 64 letters, digits, spaces, "
                "'.', '_' or '-', starting with a letter or digit and not ending with a space"
            )
        acl = KnowledgeBaseACL(
            principal.user, _access_names(readers, "readers"), _access_names(groups, "groups")
        )
        kb = KnowledgeBase(
            id=f"{principal.user}/{name}",
            collection=self._new_collection_name(name),
            acl=acl,
            created_at=now(),
            embedding_model=self.embedder.name,
            dimension=self.embedder.dimension,
        )
        # Registered before its collection exists: garbage collection deletes our collections
        # that the registry does not know, so the other order could lose a new one.
        with self._writing():
            self._registry.add_knowledge_base(kb)
            with self._open_collection(kb):
                pass
            self._keywords(kb.collection).create()
        return kb

    def knowledge_bases(self, principal: Principal) -> list[KnowledgeBase]:
        """The knowledge bases the principal may read, by id."""
        return [kb for kb in self._registry.knowledge_bases() if kb.acl.can_read(principal)]

    def get(self, principal: Principal, ref: str) -> KnowledgeBase:
        """The knowledge base `ref` (an id or a name); KnowledgeBaseNotFound unless the
        principal may read it."""
        kb = self._registry.knowledge_base(self._resolve(principal, ref))
        require_read(principal, ref, kb and kb.acl)
        return kb

    def writable(self, principal: Principal, ref: str) -> KnowledgeBase:
        """The knowledge base, if the principal may change it: AccessDenied for a reader,
        KnowledgeBaseNotFound for anyone else."""
        kb = self._registry.knowledge_base(self._resolve(principal, ref))
        require_write(principal, ref, kb and kb.acl)
        return kb

    def share(
        self, principal: Principal, ref: str, readers: Iterable[str], groups: Iterable[str]
    ) -> KnowledgeBase:
        """Replace the users and groups who may read the knowledge base (owner or admin)."""
        kb = self.writable(principal, ref)
        readers, groups = _access_names(readers, "readers"), _access_names(groups, "groups")
        with self._writing():
            self._registry.set_access(kb.id, readers, groups)
        return self.get(principal, kb.id)

    def delete(self, principal: Principal, ref: str) -> KnowledgeBase:
        """Delete the knowledge base with all its documents (owner or admin); returns it."""
        kb = self.writable(principal, ref)
        with self._writing():
            self._registry.remove_knowledge_base(kb.id)
            self._drop_collection(kb.collection)
        return kb

    # Documents

    def add_documents(
        self,
        principal: Principal,
        ref: str,
        documents: Iterable[ParsedDocument],
        refused: list[IngestError] | None = None,
    ) -> list[IngestResult]:
        """Add documents, or replace those of the same file name; their results in order.

        The documents are written together, in one transaction of each database for the whole
        batch: each transaction costs file-system round trips, several times dearer through an
        encrypted volume's FUSE daemon. Each document still changes atomically: queries see all
        its old chunks or all its new ones, also after a crash. An unchanged document is skipped
        without embedding anything. A document with no text raises IngestError before anything
        is written, or, given `refused`, is listed there while the others go in. An error while
        writing leaves every document of the batch as it was.
        """
        kb = self.writable(principal, ref)
        self._check_model(kb)
        planned = []
        for document in documents:
            try:
                planned.append(self._plan(document))
            except IngestError as exc:
                if refused is None:
                    raise
                refused.append(exc)
        results = []
        for group in _without_repeats(planned):
            with self._writing():
                results += self._add_versions(kb, group)
        return results

    def documents(self, principal: Principal, ref: str) -> list[DocumentRecord]:
        """The documents of the knowledge base, by file name."""
        return self._registry.documents(self.get(principal, ref).id)

    def delete_document(self, principal: Principal, ref: str, filename: str) -> None:
        """Delete the document and its chunks (owner or admin)."""
        kb = self.writable(principal, ref)
        with self._writing():
            removed = self._registry.remove_document(kb, document_id(filename))
            if removed is None:
                raise KnowledgeBaseError(f"no document {filename!r} in knowledge base {ref!r}")
            self._drop_versions(kb.collection, [removed.version])

    # Reading chunks

    def search(
        self, principal: Principal, ref: str, vector: Sequence[float], n: int
    ) -> list[tuple[Chunk, float]]:
        """The `n` current chunks nearest to `vector`, with their cosine similarity, best first."""
        kb = self.get(principal, ref)
        self._check_model(kb)
        index = self._keywords(kb.collection)
        with self._open_collection(kb) as collection:
            return _nearest(
                collection,
                lambda found: self._current(kb, found),
                lambda versions, ids: index.stored(kb.id, versions, ids),
                vector,
                n,
            )

    def keyword_search(
        self, principal: Principal, ref: str, query: str, n: int
    ) -> list[tuple[Chunk, float]]:
        """The `n` current chunks that best match the query's words, with their BM25 score,
        best first."""
        kb = self.get(principal, ref)
        return self._keywords(kb.collection).search(
            kb.id, query, n, lambda versions: self._current(kb, versions)
        )

    def chunks(self, principal: Principal, ref: str) -> list[Chunk]:
        """Every current chunk of the knowledge base, by file name and position."""
        kb = self.get(principal, ref)
        versions = sorted(document.version for document in self._registry.documents(kb.id))
        chunks = self._keywords(kb.collection).stored(kb.id, versions)
        return sorted(chunks, key=lambda chunk: (chunk.filename, chunk.index))

    def build_missing_keyword_indexes(self) -> list[str]:
        """Build the keyword index of each knowledge base that has none (stores written before
        there was one) from its chunks in Chroma; returns their ids.

        Runs when the store opens, and is safe to run again (a migration step may call it). The
        exclusive write lock keeps writes out while an index is built, so none is missed.
        """
        built = []
        for kb in self._registry.knowledge_bases():
            if self._keywords(kb.collection).exists():
                continue
            with write_lock(self.root, exclusive=True):
                current = self._registry.knowledge_base(kb.id)
                index = self._keywords(kb.collection)
                if current is None or current.collection != kb.collection or index.exists():
                    continue  # deleted or built by another process meanwhile
                log.info("building the keyword index of knowledge base %s", kb.id)
                # Builds hold the write lock alone: a file of one seen here is a crashed build's.
                for building in index.path.parent.glob(f"{index.path.name}.*.building"):
                    building.unlink(missing_ok=True)
                try:
                    index.rebuild(self._chunks_in_chroma(current))
                except KnowledgeBaseError as exc:
                    log.error("%s", exc)  # the others are built; this one stays without
                    continue
                built.append(kb.id)
        return built

    # Cleanup

    def collect_garbage(self) -> None:
        """Delete what interrupted writes left: this store's collections of no knowledge base,
        and chunks of versions that no document points to and no live process is writing.

        Runs when the store opens; safe while other processes write.
        """
        # Collections are listed before the registry is read. A knowledge base is registered
        # before its directory and collection are made, so every listed one of a knowledge base
        # is in the registry read after, even if it was made in between.
        with self._writing():
            collections = self.dirs.collections()
            if self._server is not None:
                prefix = _collection_prefix(self._registry.store_id)
                listed = {collection.name for collection in self._server.list_collections()}
                collections |= {name for name in listed if name.startswith(prefix)}
            known = {kb.collection for kb in self._registry.knowledge_bases()}
            for collection in sorted(collections - known):
                log.info("deleting collection %s: its knowledge base was deleted", collection)
                self._drop_collection(collection)
            dead: dict[str, list[str]] = {}
            for loose in self._registry.loose_versions():
                if not loose.writer_alive():
                    dead.setdefault(loose.collection, []).append(loose.version)
            for collection, versions in dead.items():
                self._drop_versions(collection, versions)

    # Internals

    def _writing(self):
        """The shared write lock: a backup (appliance/backup) copies the registry and Chroma's
        files only between whole writes, so the copies agree with each other."""
        return write_lock(self.root)

    def _resolve(self, principal: Principal, ref: str) -> str:
        """The id `ref` stands for: itself if it has an owner, else the principal's own
        knowledge base of that name, else the only one of that name the principal may read.

        Only readable knowledge bases are considered, so the answer tells nothing about others.
        """
        if "/" in ref:
            return ref
        own = f"{principal.user}/{ref}"
        if self._registry.knowledge_base(own) is not None:
            return own
        named = self._registry.knowledge_bases_named(ref)
        shared = [kb.id for kb in named if kb.acl.can_read(principal)]
        if len(shared) > 1:
            raise KnowledgeBaseError(
                f"several knowledge bases named {ref!r} are shared with you: say which, as "
                + " or ".join(repr(kb_id) for kb_id in shared)
            )
        return shared[0] if shared else own

    def _check_model(self, kb: KnowledgeBase) -> None:
        """Vectors of different models do not compare: refuse to mix them in one collection."""
        if (kb.embedding_model, kb.dimension) != (self.embedder.name, self.embedder.dimension):
            raise KnowledgeBaseError(
                f"knowledge base {kb.id!r} was built with the embedding model "
                f"{kb.embedding_model} ({kb.dimension} dimensions), not the configured "
                f"{self.embedder.name}: configure that model (rag.embedding_model) again, or "
                "create the knowledge base again"
            )

    def _plan(self, document: ParsedDocument) -> _Planned:
        """The document's chunks and the record of its new version (nothing written)."""
        settings = self.settings
        chunks = chunk_document(document, settings.chunk_chars, settings.chunk_overlap_chars)
        if not chunks:
            raise IngestError(document.filename, "no text found in it")
        record = DocumentRecord(
            id=document_id(document.filename),
            filename=document.filename,
            version=uuid.uuid4().hex,
            content_hash=_content_hash(chunks),
            chunks=len(chunks),
            updated_at=now(),
            source_hash=document.source_hash,
        )
        return _Planned(record, chunks)

    def _add_versions(self, kb: KnowledgeBase, group: list[_Planned]) -> list[IngestResult]:
        """Write the documents of `group` (no two of the same id) and make them current."""
        results: dict[str, IngestResult] = {}
        writes: list[_Planned] = []
        for planned in group:
            record = planned.record
            old = self._registry.document(kb.id, record.id)
            if old and old.content_hash == record.content_hash:
                if record.source_hash and old.source_hash != record.source_hash:
                    self._registry.set_source_hash(kb.id, record.id, record.source_hash)
                status = "unchanged"
                results[record.id] = IngestResult(record.filename, record.id, status, old.chunks)
            else:
                writes.append(_Planned(record, planned.chunks, old))
        if writes:
            versions = [planned.record.version for planned in writes]
            self._registry.begin_versions(kb.collection, versions)
            try:
                self._write_chunks(kb, writes)
                replaced = self._registry.commit_versions(kb, [p.record for p in writes])
            except BaseException:
                self._give_up(kb.collection, versions)
                raise
            gone = [previous.version for previous in replaced if previous]
            if gone:
                self._drop_versions(kb.collection, gone)
            for planned, previous in zip(writes, replaced, strict=True):
                record = planned.record
                status = "replaced" if previous else "added"
                results[record.id] = IngestResult(record.filename, record.id, status, record.chunks)
        return [results[planned.record.id] for planned in group]

    def _write_chunks(self, kb: KnowledgeBase, writes: list[_Planned]) -> None:
        """Store each document's chunks under its new version in Chroma and the keyword index,
        in as few writes as the batch allows; text its old version has keeps its vector."""
        self._keywords(kb.collection).add_many(
            (p.record.version, p.record.id, chunk) for p in writes for chunk in p.chunks
        )
        with self._open_collection(kb) as collection:
            reused: list[tuple[DocumentRecord, Chunk, Any]] = []
            fresh: list[tuple[DocumentRecord, Chunk]] = []
            for planned in writes:
                known = self._vectors_by_text(collection, planned.old)
                for chunk in planned.chunks:
                    vector = known.get(_text_hash(chunk.text))
                    if vector is None:
                        fresh.append((planned.record, chunk))
                    else:
                        reused.append((planned.record, chunk, vector))
            for start in range(0, len(reused), _CHUNKS_PER_ADD):
                part = reused[start : start + _CHUNKS_PER_ADD]
                _add_chunks(collection, [(r, c) for r, c, _ in part], [v for _, _, v in part])
            # Embedded in the embedder's batches, written in Chroma's: each `add` is a few
            # transactions of Chroma's database, each a round trip to an encrypted volume's
            # daemon per page, and the embedder's batches are small (16 chunks).
            texts = [chunk.text for _, chunk in fresh]
            done, vectors = 0, []
            for start, batch in self.embedder.embed_batches(texts):
                vectors.extend(batch)
                if len(vectors) >= _CHUNKS_PER_ADD or start + len(batch) == len(texts):
                    _add_chunks(collection, fresh[done : done + len(vectors)], vectors)
                    done, vectors = done + len(vectors), []

    @staticmethod
    def _vectors_by_text(collection: Collection, old: DocumentRecord | None) -> dict[str, Any]:
        """Vectors of the old version's chunks by text hash: an edited file re-embeds only the
        chunks whose text changed."""
        if old is None:
            return {}
        result = collection.get(where={"version": old.version}, include=["embeddings", "metadatas"])
        return {
            meta["chunk_hash"]: vector
            for meta, vector in zip(result["metadatas"], result["embeddings"], strict=True)
        }

    def _give_up(self, collection: str, versions: list[str]) -> None:
        """Clean up after a failed upload, without hiding why it failed."""
        try:
            self._registry.abandon_versions(collection, versions)
            self._drop_versions(collection, versions)
        except Exception:
            # The next garbage collection finishes this; the upload's own error matters more.
            log.warning("cleaning up versions %s of %s failed", versions, collection, exc_info=True)

    def _drop_versions(self, collection: str, versions: list[str]) -> None:
        from chromadb.errors import NotFoundError

        with self._chroma(collection, create=False) as client:
            # None or NotFoundError: its knowledge base was deleted, chunks included.
            if client is not None:
                with contextlib.suppress(NotFoundError):
                    chroma = client.get_collection(collection, embedding_function=None)
                    for start in range(0, len(versions), _VERSIONS_PER_GET):
                        part = versions[start : start + _VERSIONS_PER_GET]
                        chroma.delete(where={"version": {"$in": part}})
                self._index(collection).drop(versions)
        self._registry.forget_versions(collection, versions)

    def _drop_collection(self, collection: str) -> None:
        """Delete a knowledge base's collection and directory: its client is closed first, so
        an encrypted directory unmounts before its key and ciphertext are destroyed."""
        from chromadb.errors import NotFoundError

        with self._clients_lock:
            client = self._clients.pop(collection, None)
        if client is not None:
            client.close()
        with self._indexes_lock:
            index = self._indexes.pop(collection, None)
        if index is not None:
            index.close()
        if self._server is not None:
            # NotFoundError: another process's garbage collection deleted it meanwhile.
            with contextlib.suppress(NotFoundError):
                self._server.delete_collection(collection)
        self.dirs.destroy(collection)

    def _keywords(self, collection: str) -> KeywordIndex:
        """The keyword index of a knowledge base in the registry, its directory opened (made
        when missing, as its collection is)."""
        self.dirs.open(collection, create=True)
        return self._index(collection)

    def _index(self, collection: str) -> KeywordIndex:
        """The knowledge base's keyword index, kept with its connections open; beyond
        MAX_OPEN_CLIENTS, the least recently used is closed (a call using it closes its
        connection when it ends)."""
        with self._indexes_lock:
            index = self._indexes.pop(collection, None)
            if index is None:
                index = KeywordIndex(self.dirs.path(collection) / KEYWORDS_FILE)
            self._indexes[collection] = index  # last: the most recently used
            evicted = [
                self._indexes.popitem(last=False)[1]
                for _ in range(len(self._indexes) - MAX_OPEN_CLIENTS)
            ]
        for old in evicted:
            old.close()
        return index

    @contextlib.contextmanager
    def _chroma(self, collection: str, *, create: bool = True) -> Iterator[ClientAPI | None]:
        """The Chroma client that holds the collection, its directory opened (made when missing
        if `create`); None when it has no directory. An embedded one stays open while used;
        beyond MAX_OPEN_CLIENTS, the least recently used of those no call uses is closed."""
        path = self.dirs.open(collection, create=create)
        if path is None or self._server is not None:
            yield None if path is None else self._server
            return
        with self._clients_lock:
            client = self._clients.pop(collection, None)
            if client is None:
                client = embedded_chroma(path / CHROMA_DIR)
            self._clients[collection] = client  # last: the most recently used
            self._users[collection] += 1
        try:
            yield client
        finally:
            with self._clients_lock:
                self._users[collection] -= 1
                idle = [c for c in self._clients if not self._users[c]]
                evicted = [
                    self._clients.pop(c) for c in idle[: len(self._clients) - MAX_OPEN_CLIENTS]
                ]
            for old in evicted:
                old.close()

    def _chunks_in_chroma(self, kb: KnowledgeBase) -> Iterator[tuple[str, Chunk]]:
        """(version, chunk) of every current chunk, as Chroma has them: stores from before the
        keyword index gave Chroma the text too. KnowledgeBaseError for a chunk written since,
        whose text only the keyword index kept."""
        versions = sorted(document.version for document in self._registry.documents(kb.id))
        with self._open_collection(kb) as collection:
            for start in range(0, len(versions), _VERSIONS_PER_GET):
                where = {"version": {"$in": versions[start : start + _VERSIONS_PER_GET]}}
                result = collection.get(where=where, include=["documents", "metadatas"])
                for chunk_id, text, meta in zip(
                    result["ids"], result["documents"], result["metadatas"], strict=True
                ):
                    if text is None:
                        raise KnowledgeBaseError(
                            f"knowledge base {kb.id}: its keyword index is missing, and it "
                            "alone kept the chunks' text: restore it from a backup"
                        )
                    yield meta["version"], _stored(kb, chunk_id, text, meta)

    @contextlib.contextmanager
    def _open_collection(self, kb: KnowledgeBase) -> Iterator[Collection]:
        """The knowledge base's collection (made when missing), its client open while used."""
        with self._chroma(kb.collection) as client:
            assert client is not None  # made when missing
            # Vectors come from our Embedder only: Chroma's default embedding function would
            # try to download a model.
            yield client.get_or_create_collection(
                kb.collection, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
            )

    def _collection(self, kb: KnowledgeBase) -> Collection:
        """The collection for a caller that uses no other knowledge base meanwhile (a
        benchmark's bare queries): its client may be closed after MAX_OPEN_CLIENTS others."""
        with self._open_collection(kb) as collection:
            return collection

    def _current(self, kb: KnowledgeBase, versions: Iterable[str]) -> set[str]:
        # Only the versions a query found are looked up (an index lookup each): reading every
        # document's version after each change took 0.3 s at 100,000 documents, on the first
        # query after an upload, and kept them all in memory.
        return self._registry.current_versions(kb.id, set(versions))

    def _new_collection_name(self, name: str) -> str:
        """Our prefix, the name in Chroma's alphabet (readable in Chroma tools), and a random
        suffix, so a knowledge base made again under an old name never finds old chunks."""
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
        return f"{_collection_prefix(self._registry.store_id)}{slug}-{secrets.token_hex(4)}"


def _collection_prefix(store_id: str) -> str:
    # The store id keeps garbage collection away from collections of other stores that share a
    # Chroma server.
    return f"kb-{store_id}-"


def _nearest(
    collection: Collection,
    current: Callable[[list[str]], set[str]],
    stored: Callable[[list[str], list[str]], list[Chunk]],
    vector: Sequence[float],
    n: int,
) -> list[tuple[Chunk, float]]:
    """The `n` chunks of current versions nearest to `vector`, with their cosine similarity;
    `current` says which of the versions found are current, `stored` gives their chunks."""
    fetch = n
    while True:
        # Chroma answers fewer than n_results when it has fewer; no count() first: it read the
        # whole collection (4.6 ms at 100,000 chunks).
        result = collection.query(
            query_embeddings=[vector], n_results=fetch, include=["metadatas", "distances"]
        )
        metadatas = result["metadatas"][0]
        now = current([meta["version"] for meta in metadatas])
        nearest = [
            (chunk_id, distance)
            for chunk_id, meta, distance in zip(
                result["ids"][0], metadatas, result["distances"][0], strict=True
            )
            if meta["version"] in now
        ]
        if len(nearest) >= n or len(result["ids"][0]) < fetch:
            nearest = nearest[:n]
            ids = [chunk_id for chunk_id, _ in nearest]
            chunks = {chunk.id: chunk for chunk in stored(sorted(now), ids)}
            # A current version's rows are in the keyword index from before its vectors are
            # in Chroma until after they are deleted: every id found has its chunk.
            return [(chunks[chunk_id], 1.0 - distance) for chunk_id, distance in nearest]
        # Chunks of versions being written or awaiting deletion took places: ask for more.
        # Filtering after the search, not with a `$in` filter in it, keeps the common
        # query (nothing being written) one plain search whatever the number of documents.
        fetch *= 4


def _access_names(names: Iterable[str], what: str) -> frozenset[str]:
    """User or group names as a set; a single string is refused, not split into letters."""
    listed = [] if isinstance(names, str) else list(names)
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in listed):
        raise KnowledgeBaseError(f"{what} must be a list of names")
    if len(listed) > _MAX_ACCESS_NAMES:
        raise KnowledgeBaseError(f"{what}: at most {_MAX_ACCESS_NAMES} names")
    return frozenset(listed)


def _add_chunks(
    collection: Collection, chunks: Sequence[tuple[DocumentRecord, Chunk]], vectors: Any
) -> None:
    """One Chroma write of (version record, chunk) pairs, of any documents, with their vectors.

    Without the text: the keyword index keeps it. Chroma would index any text it is given for
    its own full-text search (trigrams, about ten times the text's size), which nothing here
    uses, and write those pages at every upload (4x the pages, each a round trip through an
    encrypted volume's FUSE daemon).
    """
    collection.add(
        ids=[f"{record.version}-{chunk.index}" for record, chunk in chunks],
        embeddings=vectors,
        metadatas=[_metadata(record, chunk) for record, chunk in chunks],
    )


def _metadata(record: DocumentRecord, chunk: Chunk) -> dict[str, str]:
    """What Chroma needs of a chunk: its version (current or not, and what a delete matches)
    and its text's hash (an edited document re-embeds only the text that changed).

    Where the chunk came from is in the keyword index with its text: each key here is another
    row Chroma writes and indexes per chunk (six keys cost 1.5x the time of two per `add`
    through an encrypted volume).
    """
    return {"version": record.version, "chunk_hash": _text_hash(chunk.text)}


def _stored(kb: KnowledgeBase, chunk_id: str, text: str, meta: dict[str, Any]) -> Chunk:
    return Chunk(
        id=chunk_id,
        text=text,
        kb=kb.id,
        document_id=meta["document_id"],
        filename=meta["filename"],
        index=meta["index"],
        page=meta.get("page"),
        sheet=meta.get("sheet"),
        heading=meta.get("heading"),
    )


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _content_hash(chunks: Sequence[Chunk]) -> str:
    """Changes when any chunk's text or source changes (the file, or the chunking settings)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        for part in (chunk.text, chunk.page, chunk.sheet, chunk.heading):
            digest.update(f"{part!r}\0".encode())
    return digest.hexdigest()


def _chroma_settings():
    from chromadb.config import Settings

    # No usage reports: the appliance runs offline and never phones home.
    return Settings(anonymized_telemetry=False)


def embedded_chroma(path: Path) -> ClientAPI:
    """An embedded Chroma whose files are in `path` (close it when done)."""
    import chromadb

    return chromadb.PersistentClient(path=path, settings=_chroma_settings())


def _chroma_server(settings: RagSettings) -> ClientAPI | None:
    if settings.chroma_url is None:
        return None
    import chromadb

    url = urlsplit(settings.chroma_url)
    https = url.scheme == "https"
    return chromadb.HttpClient(
        host=url.hostname or "localhost",
        port=url.port or (443 if https else 8000),
        ssl=https,
        settings=_chroma_settings(),
    )
