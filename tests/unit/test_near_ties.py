"""The integration tests' measure of how much of a moved answer must equal the undisturbed one."""

from __future__ import annotations

import pytest

from tests.near_ties import checkable_length

CLEAR, TIE = [-0.01, -5.0], [-0.7, -0.75]


def reply(content: str, tokens: list[tuple[str, list[float]]]) -> dict:
    """A chat completion with log probabilities, as vLLM answers it: `tokens` are each token's
    string and its two best candidates' log-probabilities."""
    entries = [
        {
            "token": token,
            "logprob": top[0],
            "top_logprobs": [{"token": token, "logprob": p} for p in top],
        }
        for token, top in tokens
    ]
    return {"choices": [{"message": {"content": content}, "logprobs": {"content": entries}}]}


def test_an_answer_without_near_ties_is_checked_whole():
    answer = reply("The sea is deep.", [("The", CLEAR), (" sea", CLEAR), (" is deep.", CLEAR)])
    assert checkable_length(answer, 0) == len("The sea is deep.")


def test_the_check_ends_at_the_first_near_tie_after_the_move():
    tokens = [("The", TIE), (" sea", CLEAR), (" is", TIE), (" deep", TIE), (".", CLEAR)]
    answer = reply("The sea is deep.", tokens)
    assert checkable_length(answer, 0) == 0
    assert checkable_length(answer, 2) == len("The sea")
    assert checkable_length(answer, len("The sea is")) == len("The sea is")


def test_special_tokens_the_answer_leaves_out_count_no_characters():
    # With ignore_eos a chat model can go on past the end of its turn: vLLM lists <|im_end|> and
    # <|im_start|> among the log probabilities, but skips them in the answer's text.
    tokens = [
        ("The sea.", CLEAR),
        ("<|im_end|>", CLEAR),
        ("\n", CLEAR),
        ("<|im_start|>", CLEAR),
        ("user", CLEAR),
        ("\nWhy", CLEAR),
        ("?", TIE),
    ]
    answer = reply("The sea.\nuser\nWhy?", tokens)
    assert checkable_length(answer, 0) == len("The sea.\nuser\nWhy")
    tokens[-1] = ("?", CLEAR)
    assert checkable_length(reply("The sea.\nuser\nWhy?", tokens), 0) == len("The sea.\nuser\nWhy?")


def test_tokens_that_do_not_spell_the_answer_are_refused():
    # A token's text that is not the answer's (half a character, say) would put every later
    # near-tie in the wrong place.
    answer = reply("The sea is deep.", [("The", CLEAR), ("\ufffd", CLEAR), (" is deep.", CLEAR)])
    with pytest.raises(AssertionError, match="do not spell the answer"):
        checkable_length(answer, 0)
