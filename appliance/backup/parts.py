"""What a backup holds: each kind of state, where the settings keep it, and how to copy it whole.

Every location comes from the settings (StateLayout plus the configuration's overrides), the
same for the backup and for the restore: a part goes back where the restoring host's settings
keep it. Left out on purpose: the local Slurm cluster (`appliance cluster up` writes it again),
logs, instance endpoints, sockets and pid files, compile caches, the catalog's plain model files
(downloaded or built again) and the web app's upload scratch space.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import load_catalog
from appliance.rag.kb_dirs import KBS_DIR, all_open, knowledge_base_dirs
from appliance.rag.write_lock import LOCK_FILE as RAG_LOCK_FILE
from appliance.rag.write_lock import write_lock
from appliance.security.audit import AuditLog
from appliance.state_version import schema_path
from appliance.store.format import DATA_FILE as STORE_DATA_FILE
from appliance.store.keyring import data_at_rest_kek

# SQLite's own side files: the online backup API copies what they hold into the snapshot.
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
SQLITE_MAGIC = b"SQLite format 3\0"


@dataclass(frozen=True)
class Part:
    """One kind of state: a folder or a file, the lock that keeps it whole while it is copied,
    what in it is not worth keeping (returns True for a relative path to skip), and folders kept
    elsewhere that it holds as if they were inside it (relative path -> folder, asked while
    locked)."""

    name: str
    path: Path
    kind: Literal["dir", "file"]
    lock: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    skip: Callable[[Path], bool] = lambda relative: False
    grafts: Callable[[], dict[str, Path]] = dict
    # A file's bytes, read beforehand (by root, for a backup the service account writes).
    data: bytes | None = None

    def files(self) -> Iterator[tuple[str, Path]]:
        """(name in the backup, path) of each regular file, sorted; links are not followed."""
        if self.kind == "file":
            if self.path.is_file() and not self.path.is_symlink():
                yield self.name, self.path
            return
        folders = [(Path(), self.path)]
        folders += [(Path(where), path) for where, path in sorted(self.grafts().items())]
        for where, top in folders:
            for root, dirs, names in os.walk(top):
                dirs.sort()
                for name in sorted(names):
                    path = Path(root, name)
                    relative = where / path.relative_to(top)
                    if _side_file(path) or self.skip(relative):
                        continue
                    if path.is_file() and not path.is_symlink():
                        yield f"{self.name}/{relative.as_posix()}", path


def _side_file(path: Path) -> bool:
    name = path.name
    if name.endswith(".tmp"):  # an atomic replace in progress: the file it becomes is copied
        return True
    return any(
        name.endswith(s) and path.with_name(name[: -len(s)]).exists() for s in _SQLITE_SIDE_FILES
    )


def _within(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def backup_parts(settings: ApplianceSettings, with_models: bool = False) -> list[Part]:
    """The parts of this host's state, in the order they are copied."""
    layout = settings.layout
    keys = layout.keys
    audit = AuditLog(settings.audit_dir)
    # Knowledge bases: the registry and each knowledge base's directory (its Chroma's SQLite
    # database, copied with the online backup API, its HNSW segment folders, its keyword index)
    # under the exclusive write lock, so no upload is half written in any; Chroma's cookbook
    # warns a plain copy of a live directory can be corrupt. Encrypted ones are read through
    # their mounted volumes (the backup is encrypted itself). With rag.chroma_url, vectors live
    # on that server, which needs a backup of its own.
    parts = [
        Part("keys", keys, "dir"),  # API keys and sign-in sessions, users, secrets
        Part("audit", settings.audit_dir, "dir", lock=audit.locked, skip=_named(".lock")),
        # Its sealed details (in the data volume), after it: a superset of what it names.
        Part("sealed-audit", layout.sealed_audit, "dir", lock=audit.locked),
        Part(
            "rag",
            settings.rag_dir,
            "dir",
            lock=lambda: _knowledge_bases_still(settings),
            skip=_named(RAG_LOCK_FILE),
            grafts=lambda: _mounted_knowledge_bases(settings),
        ),
        Part("conversations", settings.conversations_dir, "dir"),
        Part("training", settings.training_dir, "dir"),
        Part("store", settings.store_root, "dir", skip=_store_skip(settings, with_models)),
        Part("usage", layout.usage_db.parent, "dir"),
        Part("catalog", settings.user_catalog_file, "file"),
        Part("tls", layout.tls, "dir"),
        # The schema version: a restored state is read as the release that made it wrote it.
        Part("schema", schema_path(settings.state_dir), "file"),
    ]
    # Moved out of the keys folder by the configuration: kept as parts of their own.
    if not _within(settings.kek_file, keys):
        parts.append(Part("kek", settings.kek_file, "file"))
    if not _within(settings.signing_key_file, keys):
        parts.append(Part("signing-key", settings.signing_key_file, "file"))
    if settings.config_file is not None:
        parts.append(Part("config", settings.config_file, "file"))
    return parts


def restore_targets(settings: ApplianceSettings) -> dict[str, Part]:
    """Where each part goes back on this host. The configuration file is not put in place of
    the one in use (it may move the state elsewhere): it lands in <state_dir>/restored/."""
    parts = {part.name: part for part in backup_parts(settings, with_models=True)}
    for name, path in (("kek", settings.kek_file), ("signing-key", settings.signing_key_file)):
        parts.setdefault(name, Part(name, path, "file"))
    parts["config"] = Part("config", settings.state_dir / "restored" / "config.yaml", "file")
    return parts


@contextlib.contextmanager
def _knowledge_bases_still(settings: ApplianceSettings) -> Iterator[None]:
    """No write to any knowledge base, and every one's directory open (volumes mounted)."""
    with write_lock(settings.rag_dir, exclusive=True):
        dirs = knowledge_base_dirs(settings, data_at_rest_kek(settings))
        with all_open(dirs):
            yield


def _mounted_knowledge_bases(settings: ApplianceSettings) -> dict[str, Path]:
    """The encrypted knowledge bases' volumes (all_open mounted them), outside the rag folder:
    held as `kbs/<collection>/` in it, where a restore puts plain files to move into new volumes
    (and an unencrypted state keeps them). Their ciphertext is not copied: a restore makes each
    a new volume with a new key."""
    mounts = settings.layout.kb_mounts
    if not settings.security.data_at_rest.enabled or not mounts.is_dir():
        return {}
    return {f"{KBS_DIR}/{path.name}": path for path in mounts.iterdir()}


def _named(name: str) -> Callable[[Path], bool]:
    return lambda relative: relative.as_posix() == name


def _store_skip(settings: ApplianceSettings, with_models: bool) -> Callable[[Path], bool]:
    # Base models' weights can be downloaded or imported again: kept only with --with-models.
    # Fine-tuned ones exist nowhere else (the trainer never writes them to a disk): always kept.
    kept = None if with_models else _tuned_models(settings)

    def skip(relative: Path) -> bool:
        if relative.parts[0].startswith(".import-"):  # an import in progress
            return True
        # A model folder is `<model>/` with its header (and wrapped key) beside its data, the
        # encrypted weights.
        weights = relative.name == STORE_DATA_FILE and len(relative.parts) == 2
        return weights and kept is not None and relative.parts[0] not in kept

    return skip


def _tuned_models(settings: ApplianceSettings) -> frozenset[str] | None:
    """The store folders of the models fine-tuning made (their catalog entries name the job);
    None, keeping every model's weights, when the catalog does not read: a larger backup
    rather than a lost fine-tune."""
    try:
        catalog = load_catalog(settings)
    except ApplianceError:
        return None
    return frozenset(
        spec.source.partition(":")[2]
        for spec in catalog
        if spec.training_job and spec.source_kind == "store"
    )


def is_sqlite(path: Path) -> bool:
    """Whether `path` is a SQLite database (copied with the online backup API, not as bytes)."""
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False
