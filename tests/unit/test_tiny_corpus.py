"""The tiny model's corpus generator: deterministic, well-formed ChatML, bounded size."""

from __future__ import annotations

import re

import pytest

from appliance.model_builders import corpus
from appliance.model_builders.corpus import END_OF_TEXT, IM_END, IM_START

_TURN_RE = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n", re.S)


def _parse_chatml(doc: str) -> list[tuple[str, str]]:
    """(role, content) pairs; fails unless doc is exactly a sequence of ChatML turns."""
    turns = _TURN_RE.findall(doc)
    assert corpus.render_chatml([{"role": r, "content": c} for r, c in turns]) == doc
    return turns


def test_same_seed_same_dialogues_other_seed_differs():
    assert corpus.generate_dialogues(200, seed=3) == corpus.generate_dialogues(200, seed=3)
    assert corpus.generate_dialogues(200, seed=3) != corpus.generate_dialogues(200, seed=4)
    assert corpus.build_corpus(seed=5, dialogues=100) == corpus.build_corpus(seed=5, dialogues=100)


def test_dialogues_are_well_formed_chatml():
    docs = corpus.build_corpus(seed=0, dialogues=2000)
    chats = [d for d in docs if d.startswith(IM_START)]
    assert len(chats) == 2000
    for doc in chats:
        turns = _parse_chatml(doc)
        roles = [r for r, _ in turns]
        if roles[0] == "system":
            roles = roles[1:]
        # user, assistant, user, assistant, ...: every chat ends with the assistant's answer.
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), doc
        for _, content in turns:
            assert content.strip() == content and content, doc
            assert not any(tok in content for tok in corpus.SPECIAL_TOKENS), doc
            assert "{" not in content and "  " not in content, doc


def test_answers_are_sentences_and_articles_agree():
    for messages in corpus.generate_dialogues(3000, seed=1):
        for m in messages:
            if m["role"] == "assistant":
                assert m["content"][0].isupper(), m
                assert m["content"][-1] in ".!?", m
            # "a owl" / "an cow" would teach the model bad grammar.
            assert not re.search(r"\ba [aeiou]", m["content"]), m
            assert not re.search(r"\ban [b-df-hj-np-tv-z]", m["content"]), m


def test_render_chatml_matches_the_jinja_chat_template():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(corpus.CHAT_TEMPLATE)
    messages = corpus.generate_dialogues(20, seed=2)[0] + [{"role": "user", "content": "Hi!"}]
    for gen_prompt in (False, True):
        rendered = template.render(messages=messages, add_generation_prompt=gen_prompt)
        assert rendered == corpus.render_chatml(messages, add_generation_prompt=gen_prompt)
    assert corpus.render_chatml([{"role": "user", "content": "Hi"}], True) == (
        f"{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n"
    )


def test_default_corpus_size_and_plain_text_share():
    docs = corpus.build_corpus()
    chars = sum(len(d) for d in docs)
    # ~9 MB: enough for the ~2M tokens a default build trains on, small enough to build in <1 s.
    assert 4_000_000 < chars < 20_000_000
    plain = [d for d in docs if not d.startswith(IM_START)]
    assert plain and all(IM_START not in d and END_OF_TEXT not in d for d in plain)
    assert len(plain) / len(docs) < 0.02


def test_shipped_data_is_small_and_parsed():
    files = list(corpus.DATA_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) < 300_000
    assert len(corpus.load_explanations()) >= 40
    assert all(e.questions and e.answer for e in corpus.load_explanations())
    assert len(corpus.load_stories()) >= 10
    facts = corpus.load_facts()
    assert all(len(row) == 4 for row in facts["countries"])
    assert all(len(row) == 6 for row in facts["animals"])
    assert all(
        len(row) == 2 for key in ("colors", "opposites", "tools", "jobs") for row in facts[key]
    )


def test_vocabulary_holds_corpus_words_not_markup():
    vocab = corpus.vocabulary()
    assert {"sky", "blue", "paris", "capital", "hello", "moo", "doctor", "welcome"} <= vocab
    assert not vocab & {"im_start", "im_end", "endoftext", "im"}
    assert 800 < len(vocab) < 5000
    assert corpus.words_of("The sky's BLUE, isn't it?") == ["the", "sky's", "blue", "isn't", "it"]
