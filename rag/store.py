"""Knowledge bases in Chroma and FTS5: one collection and one keyword index each, crash-safe
document updates, access checks.

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
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from appliance.rag.access import KnowledgeBaseACL, Principal, require_read, require_write
from appliance.rag.chunking import Chunk, chunk_document
from appliance.rag.document import ParsedDocument
from appliance.rag.embeddings import Embedder
from appliance.rag.errors import IngestError, KnowledgeBaseError
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
# Under the store's root: one SQLite file per knowledge base, named after its collection.
KEYWORDS_DIR = "keywords"


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
        self, root: Path, settings: RagSettings | None = None, embedder: Embedder | None = None
    ) -> None:
        """Open (or start) the store whose registry, and embedded Chroma data, are in `root`."""
        self.settings = settings or RagSettings()
        self.embedder = embedder or Embedder.from_settings(self.settings)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._registry = Registry(root / "registry.sqlite3")
        self._client = _chroma_client(self.settings, root / "chroma")
        self.collect_garbage()
        self.build_missing_keyword_indexes()

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
            self._collection(kb)
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
        self, principal: Principal, ref: str, documents: Iterable[ParsedDocument]
    ) -> list[IngestResult]:
        """Add documents, or replace those of the same file name, one at a time.

        Each document changes atomically: queries see all its old chunks or all its new ones,
        also after a crash. An unchanged document is skipped without embedding anything. An
        error stops the batch; the documents before it stay in.
        """
        kb = self.writable(principal, ref)
        self._check_model(kb)
        return [self._add(kb, document) for document in documents]

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
            self._drop_version(kb.collection, removed.version)

    # Reading chunks

    def search(
        self, principal: Principal, ref: str, vector: Sequence[float], n: int
    ) -> list[tuple[Chunk, float]]:
        """The `n` current chunks nearest to `vector`, with their cosine similarity, best first."""
        kb = self.get(principal, ref)
        self._check_model(kb)
        collection = self._collection(kb)
        fetch = n
        while True:
            # Chroma answers fewer than n_results when it has fewer; no count() first: it read
            # the whole collection (4.6 ms at 100,000 chunks).
            result = collection.query(
                query_embeddings=[vector],
                n_results=fetch,
                include=["documents", "metadatas", "distances"],
            )
            current = self._current(kb, [meta["version"] for meta in result["metadatas"][0]])
            found = [
                (_stored(kb, chunk_id, text, meta), 1.0 - distance)
                for chunk_id, text, meta, distance in zip(
                    result["ids"][0],
                    result["documents"][0],
                    result["metadatas"][0],
                    result["distances"][0],
                    strict=True,
                )
                if meta["version"] in current
            ]
            if len(found) >= n or len(result["ids"][0]) < fetch:
                return found[:n]
            # Chunks of versions being written or awaiting deletion took places: ask for more.
            # Filtering after the search, not with a `$in` filter in it, keeps the common
            # query (nothing being written) one plain search whatever the number of documents.
            fetch *= 4

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
        chunks = [chunk for _, chunk in self._stored_chunks(self.get(principal, ref))]
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
                index.rebuild(self._stored_chunks(current))
                built.append(kb.id)
        return built

    # Cleanup

    def collect_garbage(self) -> None:
        """Delete what interrupted writes left: this store's collections of no knowledge base,
        and chunks of versions that no document points to and no live process is writing.

        Runs when the store opens; safe while other processes write.
        """
        # Collections are listed before the registry is read. A knowledge base is registered
        # before its collection is made, so every listed collection of a knowledge base is in
        # the registry read after, even if it was made in between.
        with self._writing():
            collections = [collection.name for collection in self._client.list_collections()]
            indexes = [path.stem for path in (self.root / KEYWORDS_DIR).glob("*.sqlite3")]
            known = {kb.collection for kb in self._registry.knowledge_bases()}
            prefix = _collection_prefix(self._registry.store_id)
            for collection in collections:
                if collection.startswith(prefix) and collection not in known:
                    log.info("deleting collection %s: its knowledge base was deleted", collection)
                    self._drop_collection(collection)
            for collection in set(indexes) - known:
                self._keywords(collection).delete()
            # Builds hold the write lock alone: one's file seen here is a crashed build's.
            for building in (self.root / KEYWORDS_DIR).glob("*.building"):
                building.unlink(missing_ok=True)
            for loose in self._registry.loose_versions():
                if not loose.writer_alive():
                    self._drop_version(loose.collection, loose.version)

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

    def _add(self, kb: KnowledgeBase, document: ParsedDocument) -> IngestResult:
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
        with self._writing():
            return self._add_version(kb, record, chunks)

    def _add_version(
        self, kb: KnowledgeBase, record: DocumentRecord, chunks: list[Chunk]
    ) -> IngestResult:
        old = self._registry.document(kb.id, record.id)
        if old and old.content_hash == record.content_hash:
            if record.source_hash and old.source_hash != record.source_hash:
                self._registry.set_source_hash(kb.id, record.id, record.source_hash)
            return IngestResult(record.filename, record.id, "unchanged", old.chunks)
        self._registry.begin_version(kb.collection, record.version)
        try:
            self._write_chunks(kb, record, chunks, old)
            previous = self._registry.commit_version(kb, record)
        except BaseException:
            self._give_up(kb.collection, record.version)
            raise
        if previous:
            self._drop_version(kb.collection, previous.version)
        status = "replaced" if previous else "added"
        return IngestResult(record.filename, record.id, status, record.chunks)

    def _write_chunks(
        self,
        kb: KnowledgeBase,
        record: DocumentRecord,
        chunks: list[Chunk],
        old: DocumentRecord | None,
    ) -> None:
        """Store the chunks under `record.version` in Chroma and the keyword index; text the old
        version has keeps its vector."""
        self._keywords(kb.collection).add(record.version, record.id, chunks)
        collection = self._collection(kb)
        known = self._vectors_by_text(collection, old)
        reused = [chunk for chunk in chunks if _text_hash(chunk.text) in known]
        fresh = [chunk for chunk in chunks if _text_hash(chunk.text) not in known]
        for start in range(0, len(reused), _CHUNKS_PER_ADD):
            part = reused[start : start + _CHUNKS_PER_ADD]
            vectors = [known[_text_hash(chunk.text)] for chunk in part]
            _add_chunks(collection, record, part, vectors)
        for start, vectors in self.embedder.embed_batches([chunk.text for chunk in fresh]):
            _add_chunks(collection, record, fresh[start : start + len(vectors)], vectors)

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

    def _give_up(self, collection: str, version: str) -> None:
        """Clean up after a failed upload, without hiding why it failed."""
        try:
            self._registry.abandon_version(collection, version)
            self._drop_version(collection, version)
        except Exception:
            # The next garbage collection finishes this; the upload's own error matters more.
            log.warning("cleaning up version %s of %s failed", version, collection, exc_info=True)

    def _drop_version(self, collection: str, version: str) -> None:
        from chromadb.errors import NotFoundError

        # NotFoundError: its knowledge base was deleted, chunks included.
        with contextlib.suppress(NotFoundError):
            self._client.get_collection(collection, embedding_function=None).delete(
                where={"version": version}
            )
        self._keywords(collection).drop(version)
        self._registry.forget_version(collection, version)

    def _drop_collection(self, collection: str) -> None:
        from chromadb.errors import NotFoundError

        # NotFoundError: another process's garbage collection deleted it meanwhile.
        with contextlib.suppress(NotFoundError):
            self._client.delete_collection(collection)
        self._keywords(collection).delete()

    def _keywords(self, collection: str) -> KeywordIndex:
        return KeywordIndex(self.root / KEYWORDS_DIR / f"{collection}.sqlite3")

    def _stored_chunks(self, kb: KnowledgeBase) -> Iterator[tuple[str, Chunk]]:
        """(version, chunk) of every current chunk of the knowledge base, as Chroma has them."""
        versions = sorted(document.version for document in self._registry.documents(kb.id))
        collection = self._collection(kb)
        for start in range(0, len(versions), _VERSIONS_PER_GET):
            where = {"version": {"$in": versions[start : start + _VERSIONS_PER_GET]}}
            result = collection.get(where=where, include=["documents", "metadatas"])
            for chunk_id, text, meta in zip(
                result["ids"], result["documents"], result["metadatas"], strict=True
            ):
                yield meta["version"], _stored(kb, chunk_id, text, meta)

    def _collection(self, kb: KnowledgeBase) -> Collection:
        # Vectors come from our Embedder only: Chroma's default embedding function would try
        # to download a model.
        return self._client.get_or_create_collection(
            kb.collection, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
        )

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


def _access_names(names: Iterable[str], what: str) -> frozenset[str]:
    """User or group names as a set; a single string is refused, not split into letters."""
    listed = [] if isinstance(names, str) else list(names)
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in listed):
        raise KnowledgeBaseError(f"{what} must be a list of names")
    if len(listed) > _MAX_ACCESS_NAMES:
        raise KnowledgeBaseError(f"{what}: at most {_MAX_ACCESS_NAMES} names")
    return frozenset(listed)


def _add_chunks(
    collection: Collection, record: DocumentRecord, chunks: Sequence[Chunk], vectors: Any
) -> None:
    collection.add(
        ids=[f"{record.version}-{chunk.index}" for chunk in chunks],
        embeddings=vectors,
        documents=[chunk.text for chunk in chunks],
        metadatas=[_metadata(record, chunk) for chunk in chunks],
    )


def _metadata(record: DocumentRecord, chunk: Chunk) -> dict[str, str | int]:
    metadata: dict[str, str | int] = {
        "document_id": record.id,
        "version": record.version,
        "filename": record.filename,
        "index": chunk.index,
        "chunk_hash": _text_hash(chunk.text),
    }
    # Chroma refuses None values: absent keys stand for them.
    optional = {"page": chunk.page, "sheet": chunk.sheet, "heading": chunk.heading}
    metadata.update({key: value for key, value in optional.items() if value is not None})
    return metadata


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


def _chroma_client(settings: RagSettings, path: Path) -> ClientAPI:
    import chromadb
    from chromadb.config import Settings

    # No usage reports: the appliance runs offline and never phones home.
    chroma_settings = Settings(anonymized_telemetry=False)
    if settings.chroma_url is None:
        return chromadb.PersistentClient(path=path, settings=chroma_settings)
    url = urlsplit(settings.chroma_url)
    https = url.scheme == "https"
    return chromadb.HttpClient(
        host=url.hostname or "localhost",
        port=url.port or (443 if https else 8000),
        ssl=https,
        settings=chroma_settings,
    )
