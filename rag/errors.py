"""Errors of knowledge bases: refused files, refused requests, and what was not found."""

from __future__ import annotations

from appliance.errors import ApplianceError


class IngestError(ApplianceError):
    """A file that was refused or could not be read; the message says which and why."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: refused: {reason}")
        self.filename = filename
        self.reason = reason


class KnowledgeBaseError(ApplianceError):
    """A knowledge-base request that cannot be done: a bad name, a taken name, a missing file."""


class AccessDenied(KnowledgeBaseError):
    """The user may read the knowledge base but not change it; the message names both."""

    def __init__(self, user: str, kb_name: str) -> None:
        super().__init__(self._message(user, kb_name))
        self.user = user
        self.kb_name = kb_name

    @staticmethod
    def _message(user: str, kb_name: str) -> str:
        return f"user {user!r} may read but not change knowledge base {kb_name!r}"


class KnowledgeBaseNotFound(AccessDenied):
    """No such knowledge base, or one the user may not read: the two look the same on purpose.

    Telling them apart would let anyone probe which knowledge bases exist.
    """

    @staticmethod
    def _message(user: str, kb_name: str) -> str:
        return f"knowledge base {kb_name!r} not found"
