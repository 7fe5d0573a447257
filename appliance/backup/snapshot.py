"""Writing a backup while the stack runs: each part copied under its lock, SQLite databases with
the online backup API, everything streamed as tar through the encrypted archive."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import sqlite3
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from appliance import __version__
from appliance.backup.archive import ArchiveWriter, BackupError, KeySource
from appliance.backup.manifest import MANIFEST_NAME, FileEntry, HashingReader, Manifest
from appliance.backup.parts import Part, backup_parts, is_sqlite
from appliance.backup.user_data import Reader, readable_user_data
from appliance.config import ApplianceSettings
from appliance.security.data_volume import as_found
from appliance.security.privileges import in_account


def write_backup(
    settings: ApplianceSettings, dest: Path, source: KeySource, *, with_models: bool = False
) -> Manifest:
    """Write a backup of this host's state to `dest` (never replaced: it must not exist)."""
    if dest.exists():
        raise BackupError(f"{dest} already exists; refusing to overwrite it")
    if not dest.parent.is_dir():
        raise BackupError(f"cannot write {dest}: its folder does not exist")
    # Encrypted at rest, the user content is there to copy only while its volume is open (a
    # state not sealed yet is copied as the unencrypted state it still is).
    settings = as_found(settings)
    with readable_user_data(settings, source) as reader:
        return _write(settings, dest, source, with_models, reader)


def _write(
    settings: ApplianceSettings,
    dest: Path,
    source: KeySource,
    with_models: bool,
    reader: Reader,
) -> Manifest:
    parts = backup_parts(settings, with_models)
    partial = dest.with_name(f".{dest.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with open(fd, "wb") as out:
            if reader.account is None:
                manifest = _archive(out, source, with_models, parts, reader.scratch)
            else:
                # Read by the service account, into the file this process (root) opened; the
                # files it may not read (a root-only configuration) are read here first.
                parts = [_preloaded(p) if p.kind == "file" else p for p in parts]

                def archived() -> bytes:
                    try:
                        return _archive(out, source, with_models, parts, reader.scratch).to_bytes()
                    except OSError as exc:  # said as this process would say it
                        raise BackupError(f"backup not written: {_os_reason(exc, dest)}") from None

                home = settings.layout.service_home
                manifest = Manifest.from_bytes(in_account(reader.account, home, archived))
            os.fsync(out.fileno())
        os.replace(partial, dest)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        if isinstance(exc, OSError):  # a full disk, above all: said plainly, not a traceback
            raise BackupError(f"backup not written: {_os_reason(exc, dest)}") from None
        raise
    return manifest


def _archive(
    out: BinaryIO, source: KeySource, with_models: bool, parts: list[Part], scratch_root: Path
) -> Manifest:
    """The archive of the `parts` there are, written to `out` (flushed); its manifest."""
    parts = [part for part in parts if part.data is not None or part.path.exists()]
    contents = {
        "parts": [part.name for part in parts],
        "with_models": with_models,
        "appliance_version": __version__,
    }
    # SQLite snapshots hold plaintext (documents, usage) until they are in the archive: they
    # wait in a private folder of the state directory (inside the data volume when the user
    # data is encrypted at rest), not in a shared /tmp.
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=scratch_root) as scratch:
        writer = ArchiveWriter(out, source, contents)
        files: list[FileEntry] = []
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for part in parts:
                files += _add_part(tar, part, Path(scratch))
            manifest = Manifest({part.name: part.kind for part in parts}, files)
            _add_bytes(tar, MANIFEST_NAME, manifest.to_bytes())
        writer.close()
        out.flush()
    return manifest


def _preloaded(part: Part) -> Part:
    data = part.path.read_bytes() if part.path.is_file() else None
    return dataclasses.replace(part, data=data)


def _os_reason(exc: OSError, default: Path) -> str:
    return f"{exc.filename or default}: {exc.strerror or exc}"


def _add_part(tar: tarfile.TarFile, part: Part, scratch: Path) -> list[FileEntry]:
    if part.data is not None:
        _add_bytes(tar, part.name, part.data)
        return [FileEntry(part.name, len(part.data), hashlib.sha256(part.data).hexdigest())]
    entries = []
    with part.lock():
        for name, path in part.files():
            entry = _add_file(tar, name, path, scratch)
            if entry is not None:
                entries.append(entry)
    return entries


def _add_file(tar: tarfile.TarFile, name: str, path: Path, scratch: Path) -> FileEntry | None:
    if is_sqlite(path):
        path = _sqlite_snapshot(path, scratch / f"snapshot-{len(os.listdir(scratch))}.sqlite3")
    try:
        f = path.open("rb")
    except FileNotFoundError:  # deleted since the folder was listed (a conversation, a job)
        return None
    with f:
        st = os.fstat(f.fileno())
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = st.st_size, 0o600, int(st.st_mtime)
        reader = HashingReader(f, st.st_size, name)
        tar.addfile(info, reader)
    return FileEntry(name, st.st_size, reader.digest.hexdigest())


def _sqlite_snapshot(path: Path, copy: Path) -> Path:
    """A consistent copy of a live database: SQLite's online backup reads one snapshot, with
    what its write-ahead log holds, while other connections keep writing."""
    src = sqlite3.connect(path, timeout=30)
    dst = sqlite3.connect(copy)
    try:
        src.backup(dst)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the database {path}: {exc}") from None
    finally:
        dst.close()
        src.close()
    return copy


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    tar.addfile(info, io.BytesIO(data))
