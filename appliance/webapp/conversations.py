"""Conversations as the browser keeps them: plain JSON, one list per user, newest first.

The web app's server holds no conversation: the browser sends the current one with each call
and keeps them in its local storage. Saving on the appliance is the user's choice.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

Conversation = dict[str, Any]
# What the browser stores: {user: {"conversations": [...], "save_on_server": bool}}.
BrowserStore = dict[str, Any]
TITLE_CHARS = 48


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def new_conversation() -> Conversation:
    stamp = now()
    return {
        "id": secrets.token_urlsafe(9),
        "title": "New chat",
        "messages": [],
        "model": None,
        "knowledge_bases": [],
        "system_prompt": "",
        "created_at": stamp,
        "updated_at": stamp,
    }


def text_of(message: dict[str, Any]) -> str:
    """The text of a chat message, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") if isinstance(p, dict) else str(p)
            for p in content
            if not isinstance(p, dict) or p.get("type", "text") == "text"
        )
    return "" if content is None else str(content)


def is_note(message: dict[str, Any]) -> bool:
    """A box the app adds (start-up progress, sources): shown to the user, never sent to a model."""
    return bool((message.get("metadata") or {}).get("title"))


def plain_messages(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat as stored: role, text and (for boxes) metadata, nothing component-specific."""
    out = []
    for m in history:
        item: dict[str, Any] = {"role": m["role"], "content": text_of(m)}
        if is_note(m):
            item["metadata"] = {k: v for k, v in m["metadata"].items() if v is not None}
        out.append(item)
    return out


def api_messages(history: list[dict[str, Any]], system_prompt: str = "") -> list[dict[str, str]]:
    """The chat as OpenAI messages: the system prompt, then user and assistant turns."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for m in history:
        if is_note(m) or m.get("role") not in ("user", "assistant"):
            continue
        text = text_of(m)
        if text or m["role"] == "user":
            messages.append({"role": m["role"], "content": text})
    return messages


def title_for(history: list[dict[str, Any]]) -> str:
    first = next((text_of(m) for m in history if m.get("role") == "user"), "").strip()
    first = " ".join(first.split())
    if not first:
        return "New chat"
    return first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1] + "…"


def user_conversations(store: BrowserStore | None, user: str) -> list[Conversation]:
    return list(((store or {}).get(user) or {}).get("conversations") or [])


def save_on_server(store: BrowserStore | None, user: str) -> bool:
    return bool(((store or {}).get(user) or {}).get("save_on_server"))


def _with_user(store: BrowserStore | None, user: str, **changes: Any) -> BrowserStore:
    store = dict(store or {})
    store[user] = {**(store.get(user) or {}), **changes}
    return store


def set_save_on_server(store: BrowserStore | None, user: str, on: bool) -> BrowserStore:
    return _with_user(store, user, save_on_server=on)


def with_conversations(
    store: BrowserStore | None, user: str, conversations: list[Conversation], limit: int
) -> BrowserStore:
    """The store with `user`'s conversations replaced (newest first, at most `limit`)."""
    return _with_user(store, user, conversations=conversations[:limit])


def upsert(
    store: BrowserStore | None, user: str, conversation: Conversation, limit: int
) -> BrowserStore:
    """The store with `conversation` first in `user`'s list (replacing its older copy); at most
    `limit` conversations are kept."""
    others = [c for c in user_conversations(store, user) if c["id"] != conversation["id"]]
    return with_conversations(store, user, [conversation, *others], limit)


def remove(store: BrowserStore | None, user: str, conversation_id: str | None) -> BrowserStore:
    """The store without one conversation of `user` (all of them when the id is None)."""
    kept = [
        c
        for c in user_conversations(store, user)
        if conversation_id is not None and c["id"] != conversation_id
    ]
    return _with_user(store, user, conversations=kept)


def merge(local: list[Conversation], saved: list[Conversation]) -> list[Conversation]:
    """Browser and appliance copies together: the newer copy of each, newest first."""
    by_id: dict[str, Conversation] = {}
    for c in [*saved, *local]:
        old = by_id.get(c.get("id", ""))
        if old is None or c.get("updated_at", "") >= old.get("updated_at", ""):
            by_id[c.get("id", "")] = c
    return sorted(by_id.values(), key=lambda c: c.get("updated_at", ""), reverse=True)


def export_json(user: str, conversations: list[Conversation]) -> str:
    """A download of a user's conversations: one JSON document, readable and re-importable."""
    document = {"exported_at": now(), "user": user, "conversations": conversations}
    return json.dumps(document, indent=2, ensure_ascii=False)
