"""A tamper-evident audit log: append-only JSON lines, each carrying an HMAC-SHA256 over its
content and the previous line's MAC, so editing, removing, inserting or reordering any line
breaks the chain; a separate head file (last sequence number and MAC) catches a cut-off tail.
Without the key (0600) nobody can write a chain that verifies."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import itertools
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.security.secret_files import SecretFileError, read_secret_file, write_secret_file

from appliance.errors import ApplianceError
from appliance.file_lock import flocked
from appliance.lines import jsonl_lines

KEY_BYTES = 32
GENESIS = "0" * 64
# Entries are bounded whatever a client sends (a 200 KB username must not make a 200 KB entry):
# who, what and on what are short by nature; a detail string or list keeps its start.
MAX_FIELD_CHARS = 256
MAX_DETAIL_CHARS = 4096
MAX_DETAIL_ITEMS = 256


class AuditError(ApplianceError):
    """The audit log cannot be written or read."""


@dataclass(frozen=True)
class Verification:
    """The result of checking the whole log."""

    ok: bool
    entries: int
    problem: str = ""
    line: int | None = None


def _mac(key: bytes, prev: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, (prev + canonical).encode(), hashlib.sha256).hexdigest()


def bounded(value: Any, limit: int = MAX_DETAIL_CHARS) -> Any:
    """`value` with every string cut to `limit` characters and every list or object to
    MAX_DETAIL_ITEMS items, each cut marked with how much was left out."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"{value[:limit]}...[{len(value) - limit} more characters]"
    if isinstance(value, list | tuple):
        items = [bounded(v, limit) for v in value[:MAX_DETAIL_ITEMS]]
        if len(value) > MAX_DETAIL_ITEMS:
            items.append(f"...[{len(value) - MAX_DETAIL_ITEMS} more items]")
        return items
    if isinstance(value, dict):
        kept = itertools.islice(value.items(), MAX_DETAIL_ITEMS)
        out = {bounded(str(k), MAX_FIELD_CHARS): bounded(v, limit) for k, v in kept}
        if len(value) > MAX_DETAIL_ITEMS:
            out["..."] = f"[{len(value) - MAX_DETAIL_ITEMS} more items]"
        return out
    return value


class AuditLog:
    """The log file, its head file and its key, under one directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / "audit.log"
        self.head_path = directory / "audit.head"
        self.key_path = directory / "audit.key"

    def _key(self) -> bytes:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.key_path.exists():
            with contextlib.suppress(SecretFileError):  # another process made it first
                write_secret_file(self.key_path, secrets.token_bytes(KEY_BYTES))
        return read_secret_file(self.key_path, size=KEY_BYTES, what="audit key")

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the log's lock (the gateway and the CLI both append): no entry is appended
        meanwhile, so a copy of the log and of its head agree (appliance/backup)."""
        return flocked(self.directory / ".lock")

    def _head(self) -> tuple[int, str]:
        try:
            head = json.loads(self.head_path.read_text())
            return int(head["seq"]), str(head["mac"])
        except FileNotFoundError:
            return 0, GENESIS
        except (ValueError, KeyError) as exc:
            raise AuditError(f"audit head {self.head_path} is damaged: {exc}") from None

    def append(self, actor: str, action: str, target: str = "", **detail: Any) -> dict[str, Any]:
        """Add one entry: who did what to what, with details; returns the entry as written."""
        key = self._key()
        with self.locked():
            seq, prev = self._head()
            body = {
                "seq": seq + 1,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "actor": bounded(actor, MAX_FIELD_CHARS),
                "action": bounded(action, MAX_FIELD_CHARS),
                "target": bounded(target, MAX_FIELD_CHARS),
                "detail": bounded(detail),
            }
            entry = {**body, "prev": prev, "mac": _mac(key, prev, body)}
            line = json.dumps(entry, ensure_ascii=False) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            head = json.dumps({"seq": entry["seq"], "mac": entry["mac"]})
            tmp = self.head_path.with_suffix(".tmp")
            tmp.write_text(head)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.head_path)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in jsonl_lines(self.path.read_text()) if line.strip()]

    def verify(self) -> Verification:
        """Check every line's MAC and link, the numbering, and that the head matches the end."""
        key = self._key()
        prev, count = GENESIS, 0
        # Entries are written with ensure_ascii=False: a name may hold U+2028 raw, which
        # str.splitlines() would take for a line end.
        lines = jsonl_lines(self.path.read_text()) if self.path.exists() else []
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                body = {k: entry[k] for k in ("seq", "time", "actor", "action", "target", "detail")}
                mac, linked = entry["mac"], entry["prev"]
            except (ValueError, KeyError, TypeError):
                return Verification(False, count, "the line is not an audit entry", number)
            if body["seq"] != number:
                return Verification(
                    False,
                    count,
                    f"entry number {body['seq']} where {number} was expected "
                    "(a line was removed, inserted or moved)",
                    number,
                )
            if linked != prev:
                return Verification(
                    False, count, "the link to the previous entry is broken", number
                )
            if not hmac.compare_digest(mac, _mac(key, prev, body)):
                return Verification(False, count, "the entry was altered", number)
            prev, count = mac, count + 1
        seq, head_mac = self._head()
        if seq != count or head_mac != prev:
            return Verification(
                False,
                count,
                f"the log ends at entry {count} but {seq} were written "
                "(entries at the end were removed)"
                if seq > count
                else "the log does not match its head",
                count or None,
            )
        return Verification(True, count)
