"""Split parsed documents into overlapping chunks that follow the document's structure."""

from __future__ import annotations

import hashlib
import itertools
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.rag.document import ParsedDocument, Section

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_WORD_BREAK = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document sized for embedding, with where it came from, for citations."""

    id: str
    """Stable across runs: a hash of the file name, the chunk's position and its text."""
    text: str
    filename: str
    index: int
    """Position of the chunk in its document, from 0."""
    page: int | None
    sheet: str | None
    heading: str | None
    """Heading path where the chunk's own text (after the overlap) starts."""
    kb: str = ""
    """The knowledge base that holds it (empty until stored)."""
    document_id: str = ""
    """Its document in that knowledge base (empty until stored)."""


@dataclass(frozen=True)
class _Unit:
    """The smallest piece chunks are made of: a whole section, a sentence, or a run of words."""

    text: str
    section: Section


def chunk_document(
    document: ParsedDocument, target_chars: int = 1000, overlap_chars: int = 150
) -> list[Chunk]:
    """Chunks of about `target_chars` that repeat up to `overlap_chars` of the previous chunk.

    A chunk never spans two pages, two sheets or two top-level headings, and a table row is
    never split (a row longer than `target_chars` is a chunk of its own). The overlap ends on a
    sentence or word boundary.
    """
    if not 0 <= 2 * overlap_chars < target_chars - 1:
        raise ValueError("chunking needs 0 <= overlap_chars < (target_chars - 1) / 2")
    chunks: list[Chunk] = []
    for _, group in itertools.groupby(document.sections, key=_boundary):
        units = [
            unit
            for section in group
            for unit in _units(section, max_chars=target_chars - overlap_chars - 1)
        ]
        for first, text in _pack(units, target_chars, overlap_chars):
            chunks.append(
                Chunk(
                    id=_chunk_id(document.filename, len(chunks), text),
                    text=text,
                    filename=document.filename,
                    index=len(chunks),
                    page=first.page,
                    sheet=first.sheet,
                    heading=first.heading,
                )
            )
    return chunks


def _boundary(section: Section) -> tuple[int | None, str | None, tuple[str, ...]]:
    return section.page, section.sheet, section.heading_path[:1]


def _units(section: Section, max_chars: int) -> list[_Unit]:
    """The section whole if it fits (or is a table row), else its sentences, else its words."""
    text = section.text.strip()
    if len(text) <= max_chars or section.kind == "table_row":
        return [_Unit(text, section)]
    units = []
    for sentence in _SENTENCE_BREAK.split(text):
        if len(sentence) <= max_chars:
            units.append(_Unit(sentence, section))
        else:
            words = textwrap.wrap(sentence, max_chars, break_on_hyphens=False)
            units.extend(_Unit(piece, section) for piece in words)
    return units


def _pack(units: list[_Unit], target: int, overlap: int) -> Iterator[tuple[Section, str]]:
    """Greedy packing: (section where the new text starts, chunk text) per chunk."""
    current: list[_Unit] = []
    fresh = 0  # units in `current` that are not overlap from the previous chunk
    for unit in units:
        if fresh and _size([*current, unit]) > target:
            yield current[-fresh].section, _join(current)
            current = _tail(current, overlap)
            if _size([*current, unit]) > target:  # a long table row: no room for overlap
                current = []
            fresh = 0
        current.append(unit)
        fresh += 1
    if fresh:
        yield current[-fresh].section, _join(current)


def _tail(units: list[_Unit], overlap: int) -> list[_Unit]:
    """The end of a chunk to repeat at the start of the next: whole units where they fit."""
    tail: list[_Unit] = []
    for unit in reversed(units):
        if _size([unit, *tail]) > overlap:
            break
        tail.insert(0, unit)
    if tail or not units or units[-1].section.kind == "table_row":
        return tail
    last = units[-1]
    text = _trim_start(last.text, overlap)
    return [_Unit(text, last.section)] if text else []


def _trim_start(text: str, size: int) -> str:
    """The last `size` characters or fewer of `text`, starting at a sentence or word start."""
    window = text[-size:]
    for boundary in (_SENTENCE_BREAK, _WORD_BREAK):
        match = boundary.search(window)
        if match:
            return window[match.end() :]
    return ""


def _join(units: list[_Unit]) -> str:
    """Pieces of one section are joined by a space, different sections by a line break."""
    parts = []
    for i, unit in enumerate(units):
        if i:
            parts.append(" " if unit.section is units[i - 1].section else "\n")
        parts.append(unit.text)
    return "".join(parts)


def _size(units: list[_Unit]) -> int:
    """len(_join(units)), without building the string: every separator is one character."""
    return sum(len(unit.text) for unit in units) + max(len(units) - 1, 0)


def _chunk_id(filename: str, index: int, text: str) -> str:
    digest = hashlib.sha256(f"{filename}\0{index}\0{text}".encode())
    return digest.hexdigest()[:32]
