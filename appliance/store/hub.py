"""Where an import comes from: a local checkpoint directory, or a Hugging Face hub id (online)."""

from __future__ import annotations

import re
from pathlib import Path

from appliance.errors import ApplianceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what a safetensors checkpoint needs: never pickled weights.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_source(source: str) -> tuple[Path, str]:
    """(checkpoint directory, default model name) for a directory or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    if not HUB_ID.fullmatch(source):
        raise ApplianceError(f"{source} is neither a directory nor a Hugging Face hub id")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ApplianceError("huggingface_hub is not installed: import from a directory") from None
    try:
        local = snapshot_download(source, allow_patterns=HUB_PATTERNS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ApplianceError(
            f"cannot download {source} ({type(exc).__name__}); offline, copy the checkpoint "
            "to this machine and import its directory instead"
        ) from None
    return Path(local), source.split("/", 1)[1]
