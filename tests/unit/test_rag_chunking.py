"""Chunks follow the document's structure, overlap on word boundaries and keep their source."""

from __future__ import annotations

import itertools
import re

import pytest
from appliance.rag.chunking import Chunk, chunk_document
from appliance.rag.document import ParsedDocument, Section
from appliance.rag.sniff import DocType

SENTENCES = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(60)]


def _document(sections: list[Section], filename: str = "doc.pdf") -> ParsedDocument:
    return ParsedDocument(filename=filename, doc_type=DocType.PDF, sections=sections)


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def test_small_document_is_one_chunk_with_its_source():
    document = _document([Section("Hello there.", page=3, heading_path=("Intro",))])
    [chunk] = chunk_document(document)
    assert (chunk.text, chunk.filename, chunk.index, chunk.page, chunk.sheet, chunk.heading) == (
        "Hello there.",
        "doc.pdf",
        0,
        3,
        None,
        "Intro",
    )


def test_chunks_never_cross_pages_sheets_or_top_level_headings():
    sections = [
        Section("Page one text.", page=1),
        Section("Page two text.", page=2),
        Section("Row of sheet A", kind="table_row", sheet="A"),
        Section("Row of sheet B", kind="table_row", sheet="B"),
        Section("Install", kind="heading", heading_path=("Install",)),
        Section("Linux", kind="heading", heading_path=("Install", "Linux")),
        Section("Linux steps.", heading_path=("Install", "Linux")),
        Section("macOS steps.", heading_path=("Install", "macOS")),
        Section("Usage", kind="heading", heading_path=("Usage",)),
    ]
    chunks = chunk_document(_document(sections))
    assert [(c.text, c.page, c.sheet, c.heading) for c in chunks] == [
        ("Page one text.", 1, None, None),
        ("Page two text.", 2, None, None),
        ("Row of sheet A", None, "A", None),
        ("Row of sheet B", None, "B", None),
        # Sub-headings of one top-level heading share a chunk.
        ("Install\nLinux\nLinux steps.\nmacOS steps.", None, None, "Install"),
        ("Usage", None, None, "Usage"),
    ]


def test_long_text_is_split_near_the_target_with_overlap_on_word_boundaries():
    sections = [Section(" ".join(SENTENCES[:30]), page=1), Section(SENTENCES[30], page=1)]
    document = _document(sections)
    chunks = chunk_document(document, target_chars=300, overlap_chars=60)
    assert len(chunks) > 5
    for previous, chunk in itertools.pairwise(chunks):
        assert len(chunk.text) <= 300
        # The chunk starts with the end of the previous one: whole words, at most 60 chars.
        overlap = max(
            n for n in range(len(chunk.text) + 1) if previous.text.endswith(chunk.text[:n])
        )
        assert 0 < overlap <= 60
        assert previous.text[-overlap - 1].isspace() and not chunk.text[overlap].isalnum()
    # Nothing is lost: every sentence is in some chunk, whole (each fits the target).
    for sentence in SENTENCES[:31]:
        assert any(sentence in chunk.text for chunk in chunks), sentence


def test_overlap_prefers_whole_sentences():
    text = "Alpha beta gamma delta epsilon. Short one. " * 20
    chunks = chunk_document(_document([Section(text.strip())]), target_chars=200, overlap_chars=40)
    for chunk in chunks[1:]:
        assert chunk.text.startswith(("Alpha", "Short one."))


def test_table_rows_are_grouped_but_never_split():
    rows = [f"Name: person {i}; Team: team {i % 3}; Room: {100 + i}" for i in range(50)]
    long_row = "Notes: " + "very long cell " * 30
    sections = [Section(row, kind="table_row", sheet="People") for row in rows]
    sections.insert(25, Section(long_row.strip(), kind="table_row", sheet="People"))
    chunks = chunk_document(_document(sections), target_chars=200, overlap_chars=60)
    all_rows = {section.text for section in sections}
    for chunk in chunks:
        assert chunk.sheet == "People"
        assert all(line in all_rows for line in chunk.text.split("\n")), chunk.text
        assert len(chunk.text) <= 200 or chunk.text == long_row.strip()
    covered = {line for chunk in chunks for line in chunk.text.split("\n")}
    assert covered == all_rows
    assert sum(len(chunk.text.split("\n")) for chunk in chunks) > len(all_rows)  # overlap rows


def test_words_longer_than_the_target_are_cut():
    document = _document([Section("x" * 450)])
    chunks = chunk_document(document, target_chars=200, overlap_chars=20)
    assert all(len(chunk.text) <= 200 for chunk in chunks)
    assert "".join(chunk.text for chunk in chunks) == "x" * 450


def test_chunk_ids_are_stable_and_distinct():
    document = _document([Section(s) for s in SENTENCES], filename="a.txt")
    first = chunk_document(document, target_chars=300, overlap_chars=50)
    again = chunk_document(document, target_chars=300, overlap_chars=50)
    assert [c.id for c in first] == [c.id for c in again]
    assert len({c.id for c in first}) == len(first)
    renamed = chunk_document(
        _document(document.sections, filename="b.txt"), target_chars=300, overlap_chars=50
    )
    assert not {c.id for c in first} & {c.id for c in renamed}
    assert [c.index for c in first] == list(range(len(first)))


def test_every_word_survives_in_order():
    sections = [Section(" ".join(SENTENCES[i : i + 7]), page=1 + i // 20) for i in range(0, 60, 7)]
    chunks: list[Chunk] = chunk_document(_document(sections), target_chars=250, overlap_chars=40)
    words = [w for s in sections for w in _words(s.text)]
    found: list[str] = []
    for chunk in chunks:
        chunk_words = _words(chunk.text)
        # Drop the overlap: the longest prefix of this chunk that ends what was found so far.
        skip = max(
            n for n in range(len(chunk_words) + 1) if found[len(found) - n :] == chunk_words[:n]
        )
        found.extend(chunk_words[skip:])
    assert found == words


@pytest.mark.parametrize(("target", "overlap"), [(1000, 500), (100, -1), (1, 0)])
def test_bad_sizes_are_refused(target: int, overlap: int):
    with pytest.raises(ValueError, match="overlap_chars"):
        chunk_document(_document([Section("x")]), target_chars=target, overlap_chars=overlap)
