"""Keep a knowledge base in step with a folder: its manifest (relative path -> sha256) decides.

The caller (CLI, web app, API client) reads the folder; the knowledge base never sees it. One
call takes the whole manifest and the content of some of its files: documents not in the
manifest are removed, those whose recorded file hash matches are left alone, the files sent are
added or replace their document, and the rest are reported `needed` for the caller to send.
Calling again with the same folder changes nothing, so a sync may be repeated or resumed.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from appliance.rag.access import Principal
from appliance.rag.errors import IngestError, KnowledgeBaseError
from appliance.rag.ingest import parse_file
from appliance.rag.limits import IngestLimits
from appliance.rag.store import KnowledgeBaseStore

_MAX_PATH_CHARS = 1024
_MAX_PART_BYTES = 255  # what Linux file systems allow per name
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_FILES = 100_000

Status = Literal["added", "replaced", "unchanged", "removed", "needed", "refused"]


@dataclass(frozen=True)
class SyncOutcome:
    """What a sync did with one file: its path in the folder, and why when it was refused."""

    path: str
    status: Status
    message: str = ""


def check_path(path: str) -> str:
    """The relative path as the document's name (NFC); IngestError naming it if it is not one.

    Refused rather than cleaned: two paths cleaned to one name would overwrite each other.
    """
    shown = path.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    if any(unicodedata.category(c) == "Cs" for c in path):
        raise IngestError(shown, "the path is not valid UTF-8")
    name = unicodedata.normalize("NFC", path)
    parts = name.split("/")
    if not name or len(name) > _MAX_PATH_CHARS:
        raise IngestError(shown[:200], f"the path must be 1 to {_MAX_PATH_CHARS} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name) or "\\" in name:
        raise IngestError(shown, "the path has control characters or a backslash")
    if any(part in ("", ".", "..") for part in parts):
        raise IngestError(shown, "the path must be relative, without '.', '..' or empty parts")
    if any(len(part.encode()) > _MAX_PART_BYTES for part in parts):
        raise IngestError(shown[:200], f"a part of the path is over {_MAX_PART_BYTES} bytes")
    return name


def sync(
    store: KnowledgeBaseStore,
    principal: Principal,
    ref: str,
    manifest: Mapping[str, str],
    files: Mapping[str, bytes],
    limits: IngestLimits | None = None,
) -> list[SyncOutcome]:
    """Bring the knowledge base in step with the folder of `manifest`, given the content of
    `files` (paths of the manifest); one outcome per path, removed documents included."""
    if len(manifest) > MAX_MANIFEST_FILES:
        raise KnowledgeBaseError(f"the manifest lists more than {MAX_MANIFEST_FILES} files")
    for path, digest in manifest.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise KnowledgeBaseError(f"manifest: {path!r}: not a sha256 in lowercase hex")
    kb = store.writable(principal, ref)
    outcomes: list[SyncOutcome] = []
    wanted: dict[str, str] = {}
    for path, digest in manifest.items():
        try:
            wanted[check_path(path)] = digest
        except IngestError as exc:
            outcomes.append(SyncOutcome(exc.filename, "refused", exc.reason))
    sent: dict[str, bytes] = {}
    for path, data in files.items():
        try:
            name = check_path(path)
        except IngestError as exc:
            outcomes.append(SyncOutcome(exc.filename, "refused", exc.reason))
            continue
        if name not in wanted:
            outcomes.append(SyncOutcome(name, "refused", "not in the manifest"))
        else:
            sent[name] = data
    have = {doc.filename: doc for doc in store.documents(principal, kb.id)}
    for name in sorted(set(have) - set(wanted)):
        store.delete_document(principal, kb.id, name)
        outcomes.append(SyncOutcome(name, "removed"))
    changed = {
        name: (digest, sent[name])
        for name, digest in wanted.items()
        if name in sent and not (name in have and have[name].source_hash == digest)
    }
    written = _add(store, principal, kb.id, changed, limits)
    for name, digest in sorted(wanted.items()):
        if name in written:
            outcomes.append(written[name])
        elif name in have and have[name].source_hash == digest:
            outcomes.append(SyncOutcome(name, "unchanged"))
        else:
            outcomes.append(SyncOutcome(name, "needed"))
    return outcomes


def _add(
    store: KnowledgeBaseStore,
    principal: Principal,
    kb_id: str,
    files: Mapping[str, tuple[str, bytes]],
    limits: IngestLimits | None,
) -> dict[str, SyncOutcome]:
    """Parse the files sent (path -> (manifest hash, content)) and add them as one batch, written
    together; an outcome for each."""
    outcomes: dict[str, SyncOutcome] = {}
    documents = []
    for name, (digest, data) in files.items():
        if hashlib.sha256(data).hexdigest() != digest:
            reason = "its content does not match its hash in the manifest"
            outcomes[name] = SyncOutcome(name, "refused", reason)
            continue
        try:
            # The document is named by its whole path: a.txt in two folders is two documents.
            documents.append(replace(parse_file(data, name, limits), filename=name))
        except IngestError as exc:
            outcomes[name] = SyncOutcome(name, "refused", exc.reason)
    refused: list[IngestError] = []
    for result in store.add_documents(principal, kb_id, documents, refused=refused):
        outcomes[result.filename] = SyncOutcome(result.filename, result.status)
    for exc in refused:
        outcomes[exc.filename] = SyncOutcome(exc.filename, "refused", exc.reason)
    return outcomes
