"""The backup file: a small plaintext header, then AES-256-GCM chunks with authenticated framing.

    MAGIC | header length (4 bytes) | header (JSON) | frame* ; frame = length (4 bytes) | sealed

Each backup has its own random data key, wrapped in the header by the appliance's key-encryption
key or by a key derived from a passphrase (Argon2id). Chunk i's nonce is i; its associated data
binds it to the header (SHA-256 of everything before the first frame), to its place and to
whether it is the last, so a flipped byte, a chunk moved, dropped or repeated, an altered header
or a file cut anywhere fails authentication. The header holds no secret: the format version, when,
which key (its id, or the KDF's parameters) and what the backup contains.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import ApplianceError
from appliance.security.keys import (
    KdfParams,
    KeyEncryptionKey,
    KeySetupError,
    KeyWrapError,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)

MAGIC = b"APPLIANCE-BACKUP\n"
FORMAT = 1
CHUNK_BYTES = 1 << 20
TAG_BYTES = 16
# A header is a few hundred bytes; the bound keeps a damaged length from asking for gigabytes.
_MAX_HEADER_BYTES = 1 << 16
_LENGTH = struct.Struct(">I")
_KEY_CONTEXT = b"appliance-backup:"


class BackupError(ApplianceError):
    """A backup cannot be written, read or restored; the message says why."""


class BackupDamaged(BackupError):
    """The backup's bytes failed authentication: altered, cut short, or not a backup."""


@dataclass(frozen=True)
class KeySource:
    """What seals or opens a backup: the key-encryption key, or a passphrase."""

    kek: KeyEncryptionKey | None = None
    passphrase: str | None = None

    def __post_init__(self) -> None:
        if (self.kek is None) == (self.passphrase is None):
            raise ValueError("a backup key source is a key-encryption key or a passphrase")


def _seal_key(source: KeySource, backup_id: str) -> tuple[dict[str, Any], bytes]:
    """A new data key and its record for the header (wrapped, never plain)."""
    data_key = new_data_key()
    if source.kek is not None:
        kek, record = source.kek, {"kind": "kek"}
    else:
        params = KdfParams.new()
        kek = KeyEncryptionKey.from_kdf_params(source.passphrase, params)
        record = {"kind": "passphrase", "kdf": params.to_dict()}
    record["wrapped"] = wrap_data_key(kek, data_key, _KEY_CONTEXT + backup_id.encode())
    return record, data_key


def _open_key(record: dict[str, Any], source: KeySource, backup_id: str) -> bytes:
    kind = record.get("kind")
    try:
        if kind == "kek":
            if source.kek is None:
                raise BackupError(
                    "this backup is sealed with the appliance's key-encryption key (id "
                    f"{record.get('wrapped', {}).get('kek_id')}): give it with --key-file"
                )
            kek = source.kek
        elif kind == "passphrase":
            if source.passphrase is None:
                raise BackupError("this backup is sealed with a passphrase: give --passphrase-file")
            kek = KeyEncryptionKey.from_kdf_params(
                source.passphrase, KdfParams.from_dict(record.get("kdf") or {})
            )
        else:
            raise BackupDamaged(f"unknown key kind {kind!r} in the backup's header")
        return unwrap_data_key(kek, record.get("wrapped"), _KEY_CONTEXT + backup_id.encode())
    except (KeyWrapError, KeySetupError) as exc:
        what = "wrong passphrase" if kind == "passphrase" else "wrong key-encryption key"
        raise BackupError(
            f"cannot open the backup: {what}, or its header was altered ({exc})"
        ) from None


def _nonce(index: int) -> bytes:
    return b"\0\0\0\0" + index.to_bytes(8, "big")


def _aad(header_digest: bytes, index: int, final: bool) -> bytes:
    return header_digest + index.to_bytes(8, "big") + (b"\1" if final else b"\0")


class ArchiveWriter:
    """A write-only stream that seals what it is given into `out`, chunk by chunk; `close()`
    writes the last chunk, without which a reader reports the file cut short."""

    def __init__(self, out: BinaryIO, source: KeySource, contents: dict[str, Any]):
        self._out = out
        backup_id = os.urandom(16).hex()
        key_record, data_key = _seal_key(source, backup_id)
        header = {
            "format": FORMAT,
            "id": backup_id,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "chunk_bytes": CHUNK_BYTES,
            "key": key_record,
            "contents": contents,
        }
        prefix = MAGIC + _frame(json.dumps(header, sort_keys=True).encode())
        out.write(prefix)
        self._digest = hashlib.sha256(prefix).digest()
        self._aead = AESGCM(data_key)
        self._buffer = bytearray()
        self._index = 0
        self._closed = False

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) > CHUNK_BYTES:
            # Strictly more than a chunk: the last chunk must carry the final flag, so a full
            # buffer waits until the next write (or close) says whether more follows.
            self._seal(bytes(self._buffer[:CHUNK_BYTES]), final=False)
            del self._buffer[:CHUNK_BYTES]
        return len(data)

    def close(self) -> None:
        if not self._closed:
            self._seal(bytes(self._buffer), final=True)
            self._buffer.clear()
            self._closed = True

    def _seal(self, chunk: bytes, final: bool) -> None:
        aad = _aad(self._digest, self._index, final)
        self._out.write(_frame(self._aead.encrypt(_nonce(self._index), chunk, aad)))
        self._index += 1


def _frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def _read_exactly(src: BinaryIO, n: int, what: str) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise BackupDamaged(f"the backup is cut short (in the {what})")
    return data


def read_header(src: BinaryIO) -> tuple[dict[str, Any], bytes]:
    """The header of the backup at the start of `src`, and the digest chunks are bound to."""
    magic = src.read(len(MAGIC))
    if magic != MAGIC:
        raise BackupDamaged("not an appliance backup (its first bytes are not the format's)")
    raw_length = _read_exactly(src, _LENGTH.size, "header")
    (length,) = _LENGTH.unpack(raw_length)
    if length > _MAX_HEADER_BYTES:
        raise BackupDamaged(f"the backup's header claims {length} bytes: damaged")
    raw = _read_exactly(src, length, "header")
    try:
        header = json.loads(raw)
    except ValueError:
        raise BackupDamaged("the backup's header is not valid JSON: damaged") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise BackupError(f"backup format {found!r}: this version reads format {FORMAT}")
    return header, hashlib.sha256(magic + raw_length + raw).digest()


class ArchiveReader:
    """A read-only stream of a backup's plaintext, each chunk authenticated before any of it is
    returned. `finish()` reads to the end and checks the last chunk and that nothing follows."""

    def __init__(self, src: BinaryIO, source: KeySource):
        self._src = src
        self.header, self._digest = read_header(src)
        chunk_bytes = self.header.get("chunk_bytes")
        if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= 1 << 26:
            raise BackupDamaged(f"the backup's header has a bad chunk size {chunk_bytes!r}")
        self._max_sealed = chunk_bytes + TAG_BYTES
        key = _open_key(self.header.get("key") or {}, source, str(self.header.get("id")))
        self._aead = AESGCM(key)
        self._index = 0
        self._pending = b""
        self._offset = 0
        self._final = False

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._offset == len(self._pending):
                if self._final:
                    break
                self._next_chunk()
                continue
            end = len(self._pending) if n < 0 else self._offset + n - len(out)
            out += self._pending[self._offset : end]
            self._offset = min(end, len(self._pending))
        return bytes(out)

    def finish(self) -> None:
        """Read what is left; BackupDamaged unless the last chunk came and nothing follows it."""
        while self.read(CHUNK_BYTES):
            pass
        if self._src.read(1):
            raise BackupDamaged("the backup has bytes after its last chunk: damaged")

    def _next_chunk(self) -> None:
        raw_length = self._src.read(_LENGTH.size)
        if not raw_length:
            raise BackupDamaged(
                f"the backup is cut short: it ends after {self._index} chunks, before the last"
            )
        if len(raw_length) != _LENGTH.size:
            raise BackupDamaged("the backup is cut short (in a chunk's length)")
        (length,) = _LENGTH.unpack(raw_length)
        if not TAG_BYTES <= length <= self._max_sealed:
            raise BackupDamaged(f"chunk {self._index} claims {length} bytes: damaged")
        sealed = _read_exactly(self._src, length, f"chunk {self._index}")
        nonce = _nonce(self._index)
        # A chunk can only be the last or not; if it opens as neither, it was altered.
        for final in (False, True):
            try:
                plain = self._aead.decrypt(nonce, sealed, _aad(self._digest, self._index, final))
            except InvalidTag:
                continue
            self._pending, self._offset, self._final = plain, 0, final
            self._index += 1
            return
        raise BackupDamaged(f"chunk {self._index} fails authentication: the backup was altered")
