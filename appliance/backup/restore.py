"""Checking a backup (every chunk, every file against the manifest) and restoring one into an
empty state directory: files are staged, checked, and only then moved into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.backup.archive import ArchiveReader, BackupDamaged, BackupError, KeySource
from appliance.backup.manifest import MANIFEST_NAME, FileEntry, Manifest, copy_hashed
from appliance.backup.parts import Part, restore_targets
from appliance.backup.user_data import USER_PARTS, restore_volume
from appliance.config import ApplianceSettings
from appliance.layout import PRIVATE_DIR_MODE, make_private
from appliance.rag.kb_dirs import all_open, knowledge_base_dirs
from appliance.store.keyring import data_at_rest_kek


def read_backup(src: Path, source: KeySource) -> tuple[dict[str, Any], Manifest]:
    """Decrypt and check the whole backup, writing nothing; its header and manifest."""
    with _open(src) as f:
        reader = ArchiveReader(f, source)
        manifest = _read_files(reader, set(reader.header["contents"]["parts"]), into=None)
        reader.finish()
        return reader.header, manifest


def restore_backup(settings: ApplianceSettings, src: Path, source: KeySource) -> Manifest:
    """Restore the backup into this host's (empty) state directory and the places the settings
    move parts to. Nothing is left behind when the backup fails a check."""
    targets = restore_targets(settings)
    with _open(src) as f:
        reader = ArchiveReader(f, source)
        names = reader.header["contents"]["parts"]
        unknown = sorted(set(names) - set(targets))
        if unknown:
            raise BackupError(f"the backup holds parts this version cannot restore: {unknown}")
        _require_empty(settings.state_dir, [targets[name] for name in names])
        created = not settings.state_dir.exists()
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=settings.state_dir))
        try:
            with restore_volume(settings) as inside:
                # The user content is staged inside the new data volume when it has one.
                user_staging = staging
                if inside is not None:
                    user_staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=inside))
                stage = {n: user_staging if n in USER_PARTS else staging for n in names}
                manifest = _read_files(reader, set(names), into=stage)
                reader.finish()
                for name, kind in manifest.parts.items():
                    _move_into_place(stage[name] / name, targets[name], kind)
                if user_staging != staging:
                    shutil.rmtree(user_staging)
                # While the data volume is open: the knowledge bases are inside it.
                _encrypt_knowledge_bases(settings)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if created:
                shutil.rmtree(settings.state_dir, ignore_errors=True)
            if isinstance(exc, OSError):  # a full disk, above all: said plainly
                where = exc.filename or settings.state_dir
                raise BackupError(f"nothing restored: {where}: {exc.strerror or exc}") from None
            raise
        shutil.rmtree(staging, ignore_errors=True)
    # Folders made on the way (the parents of parts) private too, as the services leave them.
    settings.layout.make_private()
    return manifest


def _encrypt_knowledge_bases(settings: ApplianceSettings) -> None:
    """With data at rest encrypted here, each restored knowledge base moves into a new volume
    of its own, with a new key, now rather than at the gateway's first use of it."""
    if settings.security.data_at_rest.enabled:
        with all_open(knowledge_base_dirs(settings, data_at_rest_kek(settings))):
            pass


@contextlib.contextmanager
def _open(src: Path):
    try:
        f = src.open("rb")
    except OSError as exc:
        raise BackupError(f"cannot read {src}: {exc.strerror}") from None
    with f:
        yield f


def _require_empty(state_dir: Path, parts: list[Part]) -> None:
    """Refuse unless the state directory, and every place a part goes outside it, is empty
    or missing: a restore never mixes with (or overwrites) state that is already there."""
    places = [state_dir] + [
        p.path for p in parts if not p.path.resolve().is_relative_to(state_dir.resolve())
    ]
    for place in places:
        if place.is_dir():
            entries = sorted(os.listdir(place))
            if entries:
                raise BackupError(
                    f"refusing to restore: {place} is not empty (it holds {len(entries)} "
                    f"entries, e.g. {entries[0]!r}). Restore only into an empty or new state "
                    "directory: set state_dir (or APPLIANCE_STATE_DIR) to one."
                )
        elif place.exists() or place.is_symlink():
            raise BackupError(f"refusing to restore: {place} already exists")


def _member_path(name: str, parts: set[str]) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or any(p in ("", ".", "..") for p in path.parts) or not path.parts:
        raise BackupDamaged(f"the backup holds an unsafe file name {name!r}")
    if path.parts[0] not in parts and name != MANIFEST_NAME:
        raise BackupDamaged(f"the backup holds {name!r}, of no part its header lists")
    return path


def _read_files(reader: ArchiveReader, parts: set[str], into: dict[str, Path] | None) -> Manifest:
    """Read every file (into its part's folder in `into` when given, 0600 in 0700 folders),
    hash it, and check the set against the manifest, which comes last."""
    found: dict[str, FileEntry] = {}
    manifest = None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if manifest is not None:
                    raise BackupDamaged("the backup has files after its manifest")
                if not member.isfile():
                    raise BackupDamaged(f"the backup holds {member.name!r}, not a regular file")
                path = _member_path(member.name, parts)
                data = tar.extractfile(member)
                if member.name == MANIFEST_NAME:
                    manifest = Manifest.from_bytes(data.read())
                    continue
                if member.name in found:
                    raise BackupDamaged(f"the backup holds {member.name!r} twice")
                folder = into[path.parts[0]] if into is not None else None
                found[member.name] = FileEntry(
                    member.name, member.size, _copy(data, member.size, folder, path)
                )
    except tarfile.TarError as exc:
        raise BackupDamaged(f"the backup's contents are not a valid archive: {exc}") from None
    if manifest is None:
        raise BackupDamaged("the backup has no manifest: it is incomplete")
    if set(manifest.parts) - parts:
        raise BackupDamaged("the manifest lists parts the header does not")
    manifest.check(found)
    return manifest


def _copy(data, size: int, into: Path | None, path: PurePosixPath) -> str:
    if into is None:
        return copy_hashed(data, size, None)
    target = into.joinpath(*path.parts)
    target.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with open(fd, "wb") as out:
        return copy_hashed(data, size, out)


def _move_into_place(staged: Path, target: Part, kind: str) -> None:
    if not staged.exists():  # a part whose folder was empty
        return
    if kind != target.kind:
        raise BackupDamaged(f"part {target.name} is a {kind} in the backup, a {target.kind} here")
    target.path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if target.path.is_dir():
        target.path.rmdir()  # empty: checked before anything was written
    shutil.move(staged, target.path)
    if kind == "dir":
        make_private(target.path)
    else:
        os.chmod(target.path, 0o600)
