"""The list of files inside a backup (name, size, SHA-256) and the parts they restore to."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

from appliance.backup.archive import BackupDamaged, BackupError

# The tar stream's last member: written after every file, so it can carry their digests.
MANIFEST_NAME = "MANIFEST.json"
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """One file of the backup, named `<part>/<path in the part>` (or `<part>` for a file)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a backup holds: its parts (name -> "dir" or "file") and every file in them."""

    parts: dict[str, str]
    files: list[FileEntry]

    def to_bytes(self) -> bytes:
        data = {"parts": self.parts, "files": [asdict(f) for f in self.files]}
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
            parts = {str(k): str(v) for k, v in data["parts"].items()}
            files = [
                FileEntry(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in data["files"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackupDamaged(f"the backup's manifest is unreadable: {exc!s}") from None
        return cls(parts, files)

    def check(self, found: dict[str, FileEntry]) -> None:
        """BackupDamaged unless the files found are exactly the manifest's, byte for byte."""
        listed = {f.name: f for f in self.files}
        missing = sorted(set(listed) - set(found))
        extra = sorted(set(found) - set(listed))
        if missing or extra:
            raise BackupDamaged(
                f"the backup's files do not match its manifest: missing {missing[:5]}, "
                f"not listed {extra[:5]}"
            )
        for name, entry in listed.items():
            if found[name] != entry:
                raise BackupDamaged(f"{name} does not match the manifest's size and SHA-256")


class HashingReader:
    """Reads exactly `size` bytes of `src` and hashes them on the way (tarfile reads through it)."""

    def __init__(self, src: BinaryIO, size: int, name: str):
        self._src = src
        self._left = size
        self._name = name
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._src.read(n)
        if len(data) != n:
            # Only a file rewritten in place shrinks under us; the state's files are replaced.
            raise BackupError(f"{self._name} shrank while it was copied: run the backup again")
        self._left -= n
        self.digest.update(data)
        return data


def copy_hashed(src: BinaryIO, size: int, out: BinaryIO | None) -> str:
    """Copy `size` bytes from src to out (or only read them) and return their SHA-256."""
    digest = hashlib.sha256()
    left = size
    while left:
        data = src.read(min(left, _READ_BYTES))
        if not data:
            raise BackupDamaged("a file in the backup is cut short")
        digest.update(data)
        if out is not None:
            out.write(data)
        left -= len(data)
    return digest.hexdigest()


def contents(manifest: Manifest) -> dict[str, Any]:
    """Files and bytes per part, for the operator."""
    out: dict[str, Any] = {name: {"files": 0, "bytes": 0} for name in manifest.parts}
    for entry in manifest.files:
        part = out[entry.name.split("/", 1)[0]]
        part["files"] += 1
        part["bytes"] += entry.size
    return out
