"""Errors of document ingestion: one per refused file, naming the file and the reason."""

from __future__ import annotations

from appliance.errors import ApplianceError


class IngestError(ApplianceError):
    """A file that was refused or could not be read; the message says which and why."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: refused: {reason}")
        self.filename = filename
        self.reason = reason
