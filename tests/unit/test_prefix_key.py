"""Prefix keys for routing: a conversation's later turns hash like its first, other
conversations and models differently, and requests without a prompt have none."""

from __future__ import annotations

from appliance.gateway.prefix_key import prefix_key

SYSTEM = {"role": "system", "content": "You answer questions about the plant. " * 40}


def chat(*turns: str, model: str = "m") -> dict:
    roles = ["user", "assistant"] * len(turns)
    messages = [SYSTEM] + [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
    return {"model": model, "messages": messages}


def test_a_conversation_keeps_its_key_from_turn_to_turn():
    first = prefix_key(chat("Where is pump 4?"))
    later = prefix_key(chat("Where is pump 4?", "In hall B.", "And its seal?"))
    assert first == later is not None
    assert prefix_key(chat("Who runs shift 2?")) != first
    assert prefix_key(chat("Where is pump 4?", model="other")) != first


def test_content_parts_prompts_and_requests_without_either():
    parts = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    assert prefix_key(parts) == prefix_key(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert prefix_key({"model": "m", "prompt": "The sun is"}) is not None
    assert prefix_key({"model": "m", "input": "embed me"}) is None
    assert prefix_key({"model": "m", "messages": ["hi"]}) is None
    assert prefix_key({"model": "m", "prompt": ""}) is None
