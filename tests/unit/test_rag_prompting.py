"""The grounded prompt numbers its sources; citations in the answer map back to them."""

from __future__ import annotations

from appliance.rag.chunking import Chunk
from appliance.rag.prompting import SYSTEM_PROMPT, build_messages, parse_citations
from appliance.rag.retrieval import Hit


def _hit(filename: str, text: str, page=None, sheet=None, heading=None) -> Hit:
    chunk = Chunk(
        f"{filename}-0",
        text,
        filename,
        0,
        page,
        sheet,
        heading,
        kb="kb",
        document_id=f"id-{filename}",
    )
    return Hit(chunk, 0.5, {"vector": 1})


HITS = [
    _hit("manual.pdf", "Grease the bearings every 500 hours.", page=3),
    _hit("parts.xlsx", "XK-4471 is the cooling circuit gasket.", sheet="Gaskets"),
    _hit("guide.md", "Install with the package manager.", heading="Install > Linux"),
    _hit("notes.txt", "word " * 100),
]


def test_the_prompt_numbers_sources_with_their_place_and_asks_for_citations():
    system, user = build_messages("How often are bearings greased?", HITS)
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert "do not contain the answer" in SYSTEM_PROMPT
    content = user["content"]
    assert user["role"] == "user"
    assert "[1] manual.pdf, page 3:\nGrease the bearings every 500 hours." in content
    assert "[2] parts.xlsx, sheet Gaskets:\nXK-4471" in content
    assert "[3] guide.md, section Install > Linux:\n" in content
    assert "[4] notes.txt:\n" in content
    assert content.endswith("Question: How often are bearings greased?")


def test_the_prompt_says_when_nothing_was_found():
    [_, user] = build_messages("Anything?", [])
    assert "(none found)" in user["content"]


def test_citations_map_to_their_sources_in_order_of_first_use():
    answer = (
        "Grease them every 500 hours [1]. The gasket is XK-4471 [2, 1][2]; see also [9] and [0]."
    )
    cited = parse_citations(answer, HITS)
    assert [c.number for c in cited.citations] == [1, 2]
    first, second = cited.citations
    assert (first.document, first.filename, first.page, first.sheet) == (
        "id-manual.pdf",
        "manual.pdf",
        3,
        None,
    )
    assert (second.filename, second.sheet, second.page) == ("parts.xlsx", "Gaskets", None)
    assert first.snippet == "Grease the bearings every 500 hours."
    assert cited.consulted == []


def test_long_snippets_are_shortened_on_a_word_boundary():
    [citation] = parse_citations("See [4].", HITS).citations
    assert len(citation.snippet) <= 240 and citation.snippet.endswith("word …")


def test_an_answer_without_citations_returns_the_top_sources_as_consulted():
    cited = parse_citations("The sources do not say.", HITS)
    assert cited.citations == []
    assert [c.filename for c in cited.consulted] == ["manual.pdf", "parts.xlsx", "guide.md"]
    assert [c.number for c in cited.consulted] == [1, 2, 3]
