"""Turn uploaded files into parsed documents: bounded reads, type by content, one parser each."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from appliance.rag.document import ParsedDocument
from appliance.rag.errors import IngestError
from appliance.rag.limits import IngestLimits, check_file_size
from appliance.rag.parsers import PARSERS
from appliance.rag.sniff import sniff
from appliance.rag.uploads import safe_filename

log = logging.getLogger(__name__)

Source = bytes | str | os.PathLike[str]
"""A file's content, or the path of a file to read it from."""


def parse_file(
    source: Source, filename: str | None = None, limits: IngestLimits | None = None
) -> ParsedDocument:
    """Parse one file; raises IngestError, naming the file, when it is refused.

    `filename` is the name shown in citations and errors (required with bytes; a path's own
    name otherwise). It is cleaned with `safe_filename` and never used to open anything.
    """
    limits = limits or IngestLimits()
    if isinstance(source, bytes):
        if filename is None:
            raise TypeError("parse_file needs a filename when given bytes")
        name, data = safe_filename(filename), source
    else:
        path = Path(source)
        name = safe_filename(path.name if filename is None else filename)
        data = _read_bounded(path, name, limits)
    check_file_size(name, len(data), limits)
    doc_type = None
    try:
        doc_type = sniff(data, name)
        sections = PARSERS[doc_type](data, name, limits)
    except IngestError:
        raise
    except Exception as exc:
        # Sniffing and parsing hostile or damaged files fail in many library-specific ways
        # (an encrypted zip member, an unknown compression method...); each failure must refuse
        # this file only, with a message, and never stop a batch.
        log.debug("parsing %s as %s failed", name, doc_type, exc_info=True)
        kind = f"{doc_type.name} file" if doc_type else "file"
        raise IngestError(
            name, f"a damaged or unreadable {kind} ({type(exc).__name__}: {exc})"
        ) from exc
    if not sections:
        raise IngestError(name, "no text found in it")
    return ParsedDocument(name, doc_type, sections, hashlib.sha256(data).hexdigest())


def parse_many(
    files: Iterable[Source | tuple[Source, str]], limits: IngestLimits | None = None
) -> tuple[list[ParsedDocument], list[IngestError]]:
    """Parse each file on its own: a refused file gives its error, the others still go in.

    Each item is a path, or a (content or path, filename) pair.
    """
    documents: list[ParsedDocument] = []
    errors: list[IngestError] = []
    for item in files:
        source, filename = item if isinstance(item, tuple) else (item, None)
        try:
            documents.append(parse_file(source, filename, limits))
        except IngestError as exc:
            errors.append(exc)
    return documents, errors


def _read_bounded(path: Path, name: str, limits: IngestLimits) -> bytes:
    """The file's content, reading one byte past the limit at most, to detect a larger file."""
    try:
        with path.open("rb") as file:
            return file.read(limits.max_file_bytes + 1)
    except OSError as exc:
        raise IngestError(name, f"could not be read ({exc.strerror or exc})") from None
