"""Knowledge bases through the gateway: create, share, upload, search, and chat completions that
answer from knowledge bases with citations. Blocking work (parsing, embedding, Chroma) runs in
threads; the store and the embedding model load on first use."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError, disk_full
from appliance.gateway.audit_events import audit
from appliance.gateway.auth import authenticated, principal
from appliance.gateway.json_body import json_model, validated
from appliance.gateway.metering import MeteredEmbedder, knowledge_quota
from appliance.gateway.protocol import RequestError, storage_full
from appliance.rag.errors import AccessDenied, KnowledgeBaseNotFound
from appliance.rag.kb_dirs import knowledge_base_dirs
from appliance.security.api_keys import Principal
from appliance.security.gocryptfs import VolumeError
from appliance.store.keyring import data_at_rest_kek

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/knowledge_bases", dependencies=[Depends(knowledge_quota)])
Who = Annotated[Principal, Depends(authenticated)]
DONE_EVENT = b"data: [DONE]"
MAX_FILES_PER_UPLOAD = 100
_AUDITED_CHANGES = 1000
# Paths name a knowledge base by its id `owner/name` (one slash) or its name: `{ref:path}`.

Names = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=1000)]


class _Body(BaseModel):
    # Strict: a string is not a list of names (it would become its letters), "5" not a number.
    model_config = ConfigDict(strict=True)


class CreateRequest(_Body):
    """The body of a knowledge base's creation."""

    name: str
    readers: Names = []
    groups: Names = []


class ShareRequest(_Body):
    """Who may read a knowledge base, replacing who could."""

    readers: Names = []
    groups: Names = []


class QueryRequest(_Body):
    """A search of one knowledge base."""

    query: str
    top_k: Annotated[int, Field(ge=1, le=100)] | None = None
    mode: Literal["hybrid", "vector"] = "hybrid"


class KnowledgeChat(_Body):
    """What a chat completion over knowledge bases needs beyond a plain one."""

    knowledge_bases: Annotated[list[str], Field(min_length=1)]
    messages: list[dict[str, Any]]


class KnowledgeService:
    """The knowledge-base store and retriever of this gateway, opened on first use."""

    def __init__(self, settings: ApplianceSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._store = None
        self._retriever = None
        # Loaded now, not at the first use: with data at rest encrypted, a missing key stops
        # the gateway's start with what to do, not a knowledge base request later.
        self._kek = data_at_rest_kek(settings)

    def _open(self):
        with self._lock:
            if self._store is None:
                # Knowledge bases bring Chroma and the embedder: loaded at their first use.
                from appliance.rag.retrieval import Retriever
                from appliance.rag.store import KnowledgeBaseStore

                embedder = MeteredEmbedder.from_settings(self.settings.rag)  # quotas count it
                dirs = knowledge_base_dirs(self.settings, self._kek)
                rag = self.settings.rag
                self._store = KnowledgeBaseStore(self.settings.rag_dir, rag, embedder, dirs)
                self._retriever = Retriever.from_settings(self._store)
        return self._store, self._retriever

    def close(self) -> None:
        """Close the store (its knowledge bases' encrypted volumes are unmounted)."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = self._retriever = None

    async def run(self, fn, *args):
        """fn(store, retriever, *args) in a thread; store errors become OpenAI error bodies."""

        def call():
            store, retriever = self._open()
            return fn(store, retriever, *args)

        try:
            return await asyncio.to_thread(call)
        except ApplianceError as exc:
            raise _request_error(exc) from None


def _request_error(exc: ApplianceError) -> RequestError:
    if disk_full(exc):
        return storage_full()
    if isinstance(exc, VolumeError):
        # The server's storage failed, not the request: the details (paths) go to the log.
        log.error("a knowledge base's encrypted volume failed: %s", exc)
        return RequestError(
            503,
            "the knowledge base's encrypted storage could not be opened; an administrator can "
            "see why in the gateway's log",
            type="server_error",
            code="storage_unavailable",
        )
    if isinstance(exc, KnowledgeBaseNotFound):
        return RequestError(404, str(exc), code="knowledge_base_not_found")
    if isinstance(exc, AccessDenied):
        return RequestError(403, str(exc), type="permission_error")
    return RequestError(400, str(exc))


def _service(request: Request) -> KnowledgeService:
    return request.app.state.gateway.knowledge


def _describe(kb, documents: int | None = None) -> dict[str, Any]:
    out = {
        "id": kb.id,
        "name": kb.name,
        "object": "knowledge_base",
        "owner": kb.acl.owner,
        "readers": sorted(kb.acl.readers),
        "groups": sorted(kb.acl.groups),
        "created_at": kb.created_at,
        "embedding_model": kb.embedding_model,
    }
    if documents is not None:
        out["documents"] = documents
    return out


@router.get("")
async def list_knowledge_bases(request: Request, who: Who) -> dict:
    def fn(store, _r):
        return [
            _describe(kb, len(store.documents(who, kb.id))) for kb in store.knowledge_bases(who)
        ]

    return {"object": "list", "data": await _service(request).run(fn)}


@router.post("", status_code=201)
async def create_knowledge_base(request: Request, who: Who) -> dict:
    """A knowledge base in the caller's own namespace: another user's of the same name does
    not matter, and the answer tells nothing about it."""
    body = await json_model(request, CreateRequest)
    readers, groups = body.readers, body.groups
    kb = await _service(request).run(lambda s, _r: s.create(who, body.name, readers, groups))
    await audit(request, who.user, "kb_create", kb.id, readers=readers, groups=groups)
    return _describe(kb, 0)


@router.post("/{ref:path}/share")
async def share_knowledge_base(ref: str, request: Request, who: Who) -> dict:
    body = await json_model(request, ShareRequest)
    readers, groups = body.readers, body.groups
    kb = await _service(request).run(lambda s, _r: s.share(who, ref, readers, groups))
    await audit(request, who.user, "kb_share", kb.id, readers=readers, groups=groups)
    return _describe(kb)


@router.get("/{ref:path}/documents")
async def list_documents(ref: str, request: Request, who: Who) -> dict:
    docs = await _service(request).run(lambda s, _r: s.documents(who, ref))
    return {"object": "list", "data": [asdict(d) for d in docs]}


@router.post("/{ref:path}/documents")
async def upload_documents(ref: str, request: Request, who: Who) -> dict:
    """Each file is parsed on its own: refused files are listed with their reason, the others
    go in (a re-uploaded file name replaces that document)."""
    # Knowledge bases bring Chroma and the embedder: loaded at their first use.
    from appliance.rag.ingest import parse_many

    service = _service(request)
    form = await _upload_form(request, service)
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise RequestError(400, "no files: send them as multipart field 'files'", param="files")
        uploads = [(await f.read(), f.filename or "upload") for f in files]
    finally:
        await form.close()

    def fn(store, _r):
        # Before any parsing: 404 for an unknown or unreadable knowledge base, 403 for a reader.
        kb = store.writable(who, ref)
        documents, errors = parse_many(uploads)
        failed: list[tuple[str, str]] = []
        try:
            # Written together, one transaction of each database for the batch; a document with
            # no text is refused (added to `errors`), the others go in.
            results = store.add_documents(who, kb.id, documents, refused=errors)
        except ApplianceError as exc:
            # The write failed as a whole: every document of the batch stays as it was.
            named = {getattr(e, "filename", "") for e in errors}
            results = []
            failed = [(d.filename, str(exc)) for d in documents if d.filename not in named]
        failed = [(getattr(e, "filename", ""), str(e)) for e in errors] + failed
        return kb, {
            "results": [asdict(r) for r in results],
            "errors": [{"filename": name, "message": message} for name, message in failed],
        }

    kb, outcome = await service.run(fn)
    await audit(
        request,
        who.user,
        "upload",
        kb.id,
        added=[(r["filename"], r["status"]) for r in outcome["results"]],
        refused=[e["filename"] for e in outcome["errors"]],
    )
    return outcome


@router.post("/{ref:path}/sync")
async def sync_folder(ref: str, request: Request, who: Who) -> dict:
    """Bring the knowledge base in step with a folder: multipart part `manifest` (a JSON object,
    relative path -> sha256 of the file, every file of the folder) and parts `files` (some of
    them, named by their path). Documents not in the manifest are removed; each path gets its
    outcome, `needed` for the changed files not sent (send them in the next call)."""
    # Knowledge bases bring Chroma and the embedder: loaded at their first use.
    from appliance.rag.sync import sync

    service = _service(request)
    form = await _upload_form(request, service, parts=1)  # the manifest
    try:
        part = form.get("manifest")
        if not isinstance(part, UploadFile):
            raise RequestError(400, "no manifest: send it as multipart part 'manifest'")
        try:
            manifest = json.loads(await part.read())
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            raise RequestError(400, "the manifest must be a JSON object: path -> sha256")
        files = {}
        for f in form.getlist("files"):
            if isinstance(f, UploadFile):
                files[f.filename or ""] = await f.read()
    finally:
        await form.close()

    def fn(store, _r):
        return store.writable(who, ref), sync(store, who, ref, manifest, files)

    kb, outcomes = await service.run(fn)
    changed = [(o.path, o.status) for o in outcomes if o.status not in ("unchanged", "needed")]
    counts = Counter(o.status for o in outcomes)
    # Bounded: a first sync may remove thousands of documents; the counts still say how many.
    await audit(request, who.user, "sync", kb.id, counts=counts, changed=changed[:_AUDITED_CHANGES])
    return {"results": [asdict(o) for o in outcomes]}


async def _upload_form(request: Request, service: KnowledgeService, parts: int = 0):
    """The multipart form of an upload (MAX_FILES_PER_UPLOAD files and `parts` other file
    parts), its declared size checked first."""
    limit = service.settings.rag.max_upload_bytes
    declared = request.headers.get("content-length")
    # Checked before the body is read: multipart parsing spools files to disk.
    if declared is None or not declared.isdigit():
        raise RequestError(411, "uploads need a Content-Length header")
    if int(declared) > limit:
        raise RequestError(413, f"the upload is larger than {limit} bytes (rag.max_upload_bytes)")
    return await request.form(max_files=MAX_FILES_PER_UPLOAD + parts)


# Registered before the knowledge base's own DELETE, whose `{ref:path}` also matches this path.
@router.delete("/{ref:path}/documents/{filename}")
async def delete_document(ref: str, filename: str, request: Request, who: Who) -> dict:
    await _service(request).run(lambda s, _r: s.delete_document(who, ref, filename))
    await audit(request, who.user, "document_delete", ref, filename=filename)
    return {"filename": filename, "deleted": True}


@router.delete("/{ref:path}")
async def delete_knowledge_base(ref: str, request: Request, who: Who) -> dict:
    kb = await _service(request).run(lambda s, _r: s.delete(who, ref))
    await audit(request, who.user, "kb_delete", kb.id)
    return {"id": kb.id, "name": kb.name, "deleted": True}


@router.post("/{ref:path}/query")
async def query(ref: str, request: Request, who: Who) -> dict:
    body = await json_model(request, QueryRequest)
    text, top_k, vector_only = body.query, body.top_k, body.mode == "vector"
    if not text.strip():
        raise RequestError(400, "'query' is required", param="query")
    hits = await _service(request).run(
        lambda _s, r: r.retrieve(who, [ref], text, top_k, vector_only=vector_only)
    )
    return {"object": "list", "data": [_hit(h) for h in hits]}


def _hit(hit) -> dict:
    c = hit.chunk
    return {
        "text": c.text,
        "score": hit.score,
        "knowledge_base": c.kb,
        "document": c.document_id,
        "filename": c.filename,
        "page": c.page,
        "sheet": c.sheet,
        "heading": c.heading,
        "found_by": dict(hit.ranks),
    }


# ----- chat completions that answer from knowledge bases -------------------------------------


async def grounded_chat(request: Request, body: dict, forward) -> Response:
    """Retrieve from the request's `knowledge_bases` for its last user message, ask the model with
    numbered sources, and return the answer with `citations` (and `sources` consulted)."""
    # Knowledge bases bring Chroma and the embedder: loaded at their first use.
    from appliance.rag.prompting import build_messages, parse_citations

    who = principal(request)
    checked = validated(body, KnowledgeChat)
    names, messages = checked.knowledge_bases, checked.messages
    del body["knowledge_bases"]
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if last is None or not isinstance(last.get("content"), str):
        raise RequestError(400, "a chat over knowledge bases needs a user message with text")
    hits = await _service(request).run(lambda _s, r: r.retrieve(who, names, last["content"]))
    grounded = build_messages(last["content"], hits)
    history = [m for m in messages if m is not last and m.get("role") != "system"]
    body["messages"] = [grounded[0], *history, grounded[1]]
    response = await forward(json.dumps(body).encode(), bool(body.get("stream")))

    def citations_of(answer: str) -> dict:
        cited = parse_citations(answer, hits)
        return {
            "citations": [asdict(c) for c in cited.citations],
            "sources": [asdict(c) for c in cited.consulted],
        }

    if isinstance(response, StreamingResponse):
        response.body_iterator = _with_citations(response.body_iterator, citations_of)
        return response
    if response.status_code != 200:
        return response
    data = json.loads(response.body)
    answer = "".join(c.get("message", {}).get("content") or "" for c in data.get("choices", []))
    data.update(citations_of(answer))
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return JSONResponse(data, headers=headers)


async def _with_citations(events: AsyncIterator[bytes], citations_of) -> AsyncIterator[bytes]:
    """Relay a chat stream, collecting the answer; put a chunk with the citations (no choices,
    like a usage chunk) just before [DONE]."""
    answer: list[str] = []
    pending = b""
    async for chunk in events:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = []
        for line in lines:
            if line.startswith(DONE_EVENT):
                event = {
                    "object": "chat.completion.chunk",
                    "choices": [],
                    **citations_of("".join(answer)),
                }
                out.append(b"data: " + json.dumps(event).encode() + b"\n\n")
            elif line.startswith(b"data: {"):
                try:
                    for choice in json.loads(line[6:]).get("choices", []):
                        answer.append(choice.get("delta", {}).get("content") or "")
                except ValueError:
                    pass
            out.append(line + b"\n")
        yield b"".join(out)
    if pending:
        yield pending
