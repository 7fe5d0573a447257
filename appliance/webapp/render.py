"""How the web app shows things: model states, citations, tables, start-up progress."""

from __future__ import annotations

import html
from typing import Any

STATE_MARK = {
    "running": "● running",
    "starting": "◐ starting",
    "parked": "◒ parked",
    "stopped": "○ stopped",
}


def model_label(model: dict[str, Any]) -> str:
    """A model as the chat's picker shows it: name and state."""
    if not model.get("installed", True):
        return f"{model['id']} · not installed"
    return f"{model['id']} · {STATE_MARK.get(model.get('state', ''), model.get('state', ''))}"


def model_choices(models: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) pairs of the chat models, running ones first."""
    order = {"running": 0, "starting": 1, "parked": 2, "stopped": 3}
    chat = [m for m in models if m.get("kind", "chat") == "chat"]
    chat.sort(key=lambda m: (not m.get("installed", True), order.get(m.get("state"), 4), m["id"]))
    return [(model_label(m), m["id"]) for m in chat]


def catalog_rows(models: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            m["id"],
            m.get("kind", ""),
            m.get("parameters") or "-",
            f"{m['size_gb']:g} GB" if m.get("size_gb") else "-",
            m.get("needs", ""),
            "yes" if m.get("installed") else "no",
            m.get("state", ""),
            m.get("instances", 0),
        ]
        for m in models
    ]


CATALOG_HEADERS = [
    "Model",
    "Kind",
    "Parameters",
    "Size",
    "Needs",
    "Installed",
    "State",
    "Instances",
]


def instance_rows(instances: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            i["job_id"],
            i["model"],
            i["state"],
            i.get("node") or "",
            i.get("inflight", 0),
            i.get("served", 0),
            i.get("reason") or "",
        ]
        for i in instances
    ]


INSTANCE_HEADERS = ["Slurm job", "Model", "State", "Node", "In flight", "Served", "Note"]


def source_place(c: dict[str, Any]) -> str:
    """Where a cited passage is: "manual.pdf, page 3"."""
    parts = [c.get("filename", "")]
    if c.get("page") is not None:
        parts.append(f"page {c['page']}")
    if c.get("sheet"):
        parts.append(f"sheet {c['sheet']}")
    return ", ".join(parts)


def citations_title(event: dict[str, Any]) -> str | None:
    if event.get("citations"):
        return f"Sources cited ({len(event['citations'])})"
    if event.get("sources"):
        return f"Sources consulted ({len(event['sources'])}), none cited"
    return None


def citations_markdown(event: dict[str, Any]) -> str:
    """The cited (or, when none is cited, the consulted) sources: place, snippet, and the whole
    passage behind a click."""
    blocks = []
    for c in event.get("citations") or event.get("sources") or []:
        passage = html.escape(c.get("passage") or c.get("snippet", ""))
        blocks.append(
            f"**[{c['number']}] {html.escape(source_place(c))}**\n\n"
            f"> {html.escape(c.get('snippet', ''))}\n\n"
            f"<details><summary>Open the passage</summary>\n\n{passage}\n\n</details>"
        )
    return "\n\n".join(blocks)


def document_rows(documents: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [d.get("filename", ""), d.get("chunks", ""), d.get("updated_at", "")] for d in documents
    ]


DOCUMENT_HEADERS = ["Document", "Chunks", "Updated"]


def hits_markdown(hits: list[dict[str, Any]]) -> str:
    if not hits:
        return "Nothing found."
    return "\n\n".join(
        f"**{n}. {html.escape(source_place(h))}** (score {h.get('score', 0):.3f})\n\n"
        f"> {html.escape(' '.join(h.get('text', '').split())[:400])}"
        for n, h in enumerate(hits, start=1)
    )


def kb_ref(kb: dict[str, Any], user: str | None) -> str:
    """How the web app names a knowledge base: its name if the user owns it, else `owner/name`.

    Names are unique per owner only; the gateway reads a bare name as the user's own first.
    """
    owner = kb.get("owner")
    return kb["name"] if owner in (None, user) else f"{owner}/{kb['name']}"


def split_names(text: str) -> list[str]:
    """ "alice, bob carol" -> ["alice", "bob", "carol"] (readers and groups as typed)."""
    return [n for n in text.replace(",", " ").split() if n]


def usage_markdown(rows: list[dict[str, Any]]) -> str:
    """A user's own use against their limits, one line per user and key."""
    parts = []
    for u in rows:
        limits = u.get("limits") or {}
        rpm, tpd = limits.get("requests_per_minute"), limits.get("tokens_per_day")
        who = "You" if u["kind"] == "user" else f"Key {u['name']}"
        parts.append(
            f"{who}: {u['requests_last_minute']} requests in the last minute"
            f"{f' (limit {rpm})' if rpm else ''}, {u['tokens_today']} tokens today"
            f"{f' (limit {tpd})' if tpd else ''}."
        )
    return "**Your usage.** " + " ".join(parts) if parts else "**Your usage.** No requests yet."
