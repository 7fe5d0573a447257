"""The prompt prefix a request names, for prefix-aware routing (serving/routing.py
PrefixAffinity): a hash of its system prompt and first user message, or of its prompt's start.
Later turns of one conversation repeat both, so they hash alike and meet their cached prefix."""

from __future__ import annotations

import hashlib
from typing import Any

# Enough text to tell conversations apart; more would only cost hashing.
PREFIX_CHARS = 4096


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prefix_key(body: dict[str, Any]) -> str | None:
    """The key of a chat or completion request's prefix, or None when it names none."""
    messages = body.get("messages")
    if isinstance(messages, list):
        lead = []
        for message in messages:
            if not isinstance(message, dict):
                return None
            lead.append(f"{message.get('role')}\n{_text(message.get('content'))}")
            if message.get("role") == "user":
                break  # the first user turn ends what every later turn repeats
        text = "\n\n".join(lead)
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        return None
    if not text:
        return None
    lead_text = f"{body.get('model')}\0{text[:PREFIX_CHARS]}"
    return hashlib.blake2b(lead_text.encode(errors="replace"), digest_size=16).hexdigest()
