"""Where a moved answer must equal the undisturbed one: up to the first near-tie after the move.

Two candidates closer than NEAR_TIE (in log-probability) are a near-tie: a prefill computes
slightly different logits than decoding, so after a move greedy decoding may pick the other one
(docs/preemption.md)."""

from __future__ import annotations

from typing import Any

NEAR_TIE = 0.1


def checkable_length(reply: dict[str, Any], moved_after_chars: int) -> int:
    """Characters of the undisturbed answer `reply` (a chat completion asked for `logprobs` and
    `top_logprobs` of 2) that a moved one must reproduce: up to the first near-tie after the move
    point (all of it when there is none)."""
    choice = reply["choices"][0]
    text, entries = choice["message"]["content"], choice["logprobs"]["content"]
    # Where each token's text begins in the answer. Special tokens are listed by name but left
    # out of the text (with ignore_eos the tiny model goes on past <|im_end|>, into a next turn
    # that begins with <|im_start|>): they add no characters.
    starts, offset = [], 0
    for entry in entries:
        starts.append(offset)
        if text.startswith(entry["token"], offset):
            offset += len(entry["token"])
    assert offset == len(text), f"the tokens do not spell the answer: {entries!r}, {text!r}"
    for start, entry in zip(starts, entries, strict=True):
        top = entry["top_logprobs"]
        tie = len(top) > 1 and top[0]["logprob"] - top[1]["logprob"] < NEAR_TIE
        if start >= moved_after_chars and tie:
            return start
    return len(text)
