"""A tamper-evident audit log: append-only JSON lines, each carrying an HMAC-SHA256 over its
content and the previous line's MAC, so editing, removing, inserting or reordering any line
breaks the chain; a separate head file (last sequence number and MAC) catches a cut-off tail.
Without the key (0600) nobody can write a chain that verifies. Details that must not lie in
plaintext (recorded prompts, with the user content encrypted at rest) go to a file in the data
volume; the entry keeps a salted digest of them, so the chain covers them too."""

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
from typing import TYPE_CHECKING, Any

from appliance.security.secret_files import SecretFileError, read_secret_file, write_secret_file

from appliance.errors import ApplianceError
from appliance.file_lock import flocked
from appliance.lines import jsonl_lines

if TYPE_CHECKING:
    from appliance.config import ApplianceSettings

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


def _sealed_digest(nonce: str, detail: Any) -> str:
    canonical = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((nonce + canonical).encode()).hexdigest()


class AuditLog:
    """The log file, its head file and its key, under one directory; with `sealed` (a folder in
    the data volume), the file of the details kept out of the plaintext chain."""

    def __init__(self, directory: Path, sealed: Path | None = None):
        self.directory = directory
        self.path = directory / "audit.log"
        self.head_path = directory / "audit.head"
        self.key_path = directory / "audit.key"
        self.sealed_path = sealed / "details.jsonl" if sealed is not None else None

    def _key(self) -> bytes:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.key_path.exists():
            with contextlib.suppress(SecretFileError):  # another process made it first
                write_secret_file(self.key_path, secrets.token_bytes(KEY_BYTES))
                self._keep_owner(self.key_path)
        return read_secret_file(self.key_path, size=KEY_BYTES, what="audit key")

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the log's lock (the gateway and the CLI both append): no entry is appended
        meanwhile, so a copy of the log and of its head agree (appliance/backup)."""
        return flocked(self.directory / ".lock")

    def _keep_owner(self, *paths: Path) -> None:
        # Root's CLI appends to the log of services that run as their own account: what it
        # creates or replaces stays that account's (the folder's), or their next entry fails.
        if os.geteuid() != 0:
            return
        folder = self.directory.stat()
        for path in paths:
            if path.stat().st_uid != folder.st_uid:
                os.chown(path, folder.st_uid, folder.st_gid)

    def _head(self) -> tuple[int, str]:
        try:
            head = json.loads(self.head_path.read_text())
            return int(head["seq"]), str(head["mac"])
        except FileNotFoundError:
            return 0, GENESIS
        except (ValueError, KeyError) as exc:
            raise AuditError(f"audit head {self.head_path} is damaged: {exc}") from None

    def append(
        self,
        actor: str,
        action: str,
        target: str = "",
        sealed: dict[str, Any] | None = None,
        **detail: Any,
    ) -> dict[str, Any]:
        """Add one entry: who did what to what, with details; returns the entry as written.
        `sealed` details go to the sealed file when the log has one (the entry holds their
        digest, `sealed`), else into the entry like the others."""
        key = self._key()
        if sealed and self.sealed_path is None:
            detail = {**detail, **sealed}
        with self.locked():
            seq, prev = self._head()
            if sealed and self.sealed_path is not None:
                detail = {**detail, "sealed": self._append_sealed(seq + 1, sealed)}
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
            _append_line(self.path, line)
            head = json.dumps({"seq": entry["seq"], "mac": entry["mac"]})
            tmp = self.head_path.with_suffix(".tmp")
            tmp.write_text(head)
            os.chmod(tmp, 0o600)
            self._keep_owner(tmp, self.path)
            os.replace(tmp, self.head_path)
        return entry

    def _append_sealed(self, seq: int, detail: dict[str, Any]) -> str:
        # Written before the entry that names it: a failure here records nothing in plaintext.
        # A random salt per entry: the digest in the chain cannot confirm a guessed prompt.
        assert self.sealed_path is not None
        nonce = secrets.token_hex(16)
        kept = bounded(detail)
        self.sealed_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = {"seq": seq, "nonce": nonce, "detail": kept}
        _append_line(self.sealed_path, json.dumps(record, ensure_ascii=False) + "\n")
        return _sealed_digest(nonce, kept)

    def _sealed_details(self) -> dict[tuple[int, str], dict[str, Any]]:
        """The sealed file's details by (entry number, digest); AuditError saying why when the
        data volume is not open to this process."""
        assert self.sealed_path is not None
        try:
            text = self.sealed_path.read_text()
        except PermissionError:
            raise AuditError(
                "the details recorded in the encrypted data volume (prompts) cannot be read: "
                "the volume is open for the services' account only; run this as it, e.g. "
                "`runuser -u <security.service_user> -- appliance audit ...`"
            ) from None
        except FileNotFoundError:
            # The folder is made with the first entry: none at all is a data volume closed
            # (its mount point empty); the folder without the file is a file removed.
            if not self.sealed_path.parent.is_dir():
                raise AuditError(
                    "the details recorded in the encrypted data volume (prompts) cannot be read: "
                    "the volume is sealed; `appliance data open` opens it (the services open it "
                    "as they start)"
                ) from None
            return {}
        found = {}
        for line in jsonl_lines(text):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                digest = _sealed_digest(record["nonce"], record["detail"])
                found[(int(record["seq"]), digest)] = record["detail"]
        return found

    def entries(self) -> list[dict[str, Any]]:
        """The entries, sealed details put back in (AuditError when they cannot be read)."""
        if not self.path.exists():
            return []
        entries = [json.loads(line) for line in jsonl_lines(self.path.read_text()) if line.strip()]
        if self.sealed_path is None or not any(_sealed_ref(e) for e in entries):
            return entries
        found = self._sealed_details()
        for entry in entries:
            if digest := _sealed_ref(entry):
                missing = {"sealed": f"{digest} (missing from {self.sealed_path})"}
                entry["detail"] = {
                    **entry["detail"],
                    **found.get((entry["seq"], digest), missing),
                }
        return entries

    def verify(self) -> Verification:
        """Check every line's MAC and link, the numbering, and that the head matches the end."""
        key = self._key()
        prev, count = GENESIS, 0
        sealed: list[tuple[int, str]] = []
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
            if _sealed_ref(entry):
                sealed.append((number, entry["detail"]["sealed"]))
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
        if sealed and self.sealed_path is not None:
            try:
                found = self._sealed_details()
            except AuditError as exc:
                raise AuditError(f"the chain of {count} entries is intact, but {exc}") from None
            for number, digest in sealed:
                if (number, digest) not in found:
                    problem = f"its details in {self.sealed_path} were altered or removed"
                    return Verification(False, count, problem, number)
        return Verification(True, count)


def _sealed_ref(entry: dict[str, Any]) -> str | None:
    detail = entry.get("detail")
    digest = detail.get("sealed") if isinstance(detail, dict) else None
    return digest if isinstance(digest, str) else None


def _append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def audit_log(settings: ApplianceSettings) -> AuditLog:
    """The appliance's audit log, its sealed details in the data volume when there is one (or
    where an unencrypted state restored them from a backup of an encrypted one)."""
    layout = settings.layout
    sealed = layout.sealed_audit if layout.encrypted or layout.sealed_audit.is_dir() else None
    return AuditLog(settings.audit_dir, sealed)
