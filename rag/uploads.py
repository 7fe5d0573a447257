"""Display names for uploaded files: the name a client sends is never trusted or used as a path."""

from __future__ import annotations

import unicodedata

from appliance.rag.errors import IngestError

_MAX_NAME_CHARS = 255


def safe_filename(name: str) -> str:
    """The last path component of `name`, without control or format characters.

    `../../etc/passwd` gives `passwd`; both separators count, since the client may run Windows.
    Format characters go too: a right-to-left override can make `gpj.exe` read as `exe.jpg`.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFC", base)
    base = "".join(c for c in base if unicodedata.category(c) not in ("Cc", "Cf")).strip()
    if base in ("", ".", ".."):
        shown = name.encode("unicode_escape").decode("ascii") or "(no name)"
        raise IngestError(shown, "the file name is empty once directories are removed")
    return base[:_MAX_NAME_CHARS]
