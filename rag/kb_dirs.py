"""Where each knowledge base keeps its files (its embedded Chroma, its keyword index): a directory
of its own: plain, `<rag root>/kbs/<collection>/`; or, with data at rest encrypted, the mount
point of a gocryptfs volume of its own whose key is destroyed with it, outside the rag root
(docs/security.md).

The store asks for a directory with `open` and gives it back with `close`; the encrypted kind
mounts on the first `open` and unmounts at `close` unless another process still uses it. Each
user of a mounted volume holds a shared flock(2) on its lock file; mounting, unmounting and
destroying take it exclusively, so one process never unmounts what another reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from appliance.rag.errors import KnowledgeBaseError
from appliance.security.gocryptfs import EncryptedVolume, VolumeError, is_mounted
from appliance.security.keys import (
    KeyEncryptionKey,
    KeyWrapError,
    new_data_key,
    rewrap_data_key,
    unwrap_data_key,
    wrap_data_key,
)

from appliance.config import ApplianceSettings

log = logging.getLogger(__name__)

KBS_DIR = "kbs"
# A collection name as Chroma allows it: no "/", and never "." or ".." (it starts and ends with
# a letter or digit), so a directory named after it stays inside `kbs/` whatever the registry
# holds.
_COLLECTION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{1,510})[A-Za-z0-9]")
_KEY_SUFFIX = ".key"
_LOCK_SUFFIX = ".lock"
# How long a mount or destroy waits for other processes to finish with the volume.
LOCK_TIMEOUT_S = 60.0
# A closed Chroma client's files close when its objects are collected; an unmount waits this
# long for the last of them before it leaves the volume mounted (reused at the next open).
UNMOUNT_TRIES = 20
UNMOUNT_PAUSE_S = 0.05


def knowledge_base_dirs(
    settings: ApplianceSettings, kek: KeyEncryptionKey | None
) -> KnowledgeBaseDirs:
    """The knowledge bases' directories as configured: encrypted volumes when
    `security.data_at_rest.enabled` (`kek` is then required), plain directories otherwise."""
    if not settings.security.data_at_rest.enabled:
        return KnowledgeBaseDirs(settings.rag_dir)
    if kek is None:
        raise KnowledgeBaseError("encrypted knowledge bases need the key-encryption key")
    layout = settings.layout
    return EncryptedKnowledgeBaseDirs(settings.rag_dir, layout.kb_volumes, layout.kb_mounts, kek)


def key_context(collection: str) -> bytes:
    """What a knowledge base's wrapped key is bound to: a wrap copied beside another knowledge
    base's volume does not unwrap there."""
    return f"knowledge-base:{collection}".encode()


class KnowledgeBaseDirs:
    """Plain directories, one per knowledge base, under `<rag root>/kbs/`."""

    def __init__(self, rag_root: Path) -> None:
        self.root = rag_root / KBS_DIR
        # Directories known to be there until closed: each query opens its knowledge base's
        # twice, and on a FUSE file system (the rag root in a gocryptfs data volume) every
        # mkdir and stat is a round trip through its daemon.
        self._opened: set[str] = set()

    def path(self, collection: str) -> Path:
        """The knowledge base's directory (mounted or not); KnowledgeBaseError for a name that is
        not a collection's."""
        if not isinstance(collection, str) or not _COLLECTION.fullmatch(collection):
            raise KnowledgeBaseError(f"{collection!r} is not a knowledge base's collection name")
        return self.root / collection

    def collections(self) -> set[str]:
        """The collections that have a directory (or a volume) here."""
        return _named_dirs(self.root)

    def open(self, collection: str, *, create: bool) -> Path | None:
        """The knowledge base's directory, ready for use; made when missing if `create`, else
        None when it has none."""
        path = self.path(collection)
        if collection in self._opened:
            return path
        if create:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.is_dir():
            return None
        self._opened.add(collection)
        return path

    def close(self, collection: str) -> None:
        """This process is done with the directory for now (files closed)."""
        self._opened.discard(collection)

    def close_all(self) -> None:
        """`close` every directory this object opened."""
        self._opened.clear()

    def destroy(self, collection: str) -> None:
        """Delete the knowledge base's files; its files must be closed."""
        self._opened.discard(collection)
        shutil.rmtree(self.path(collection), ignore_errors=True)


class EncryptedKnowledgeBaseDirs(KnowledgeBaseDirs):
    """One gocryptfs volume per knowledge base: its ciphertext in `<volumes>/<collection>/`, its
    key, wrapped by the key-encryption key, beside it in `<volumes>/<collection>.key`, mounted
    at `<mounts>/<collection>/`. Both outside the rag root, which may itself be inside the data
    volume: no FUSE mount inside another (fusermount3 cannot reach a mount point inside one
    made by a non-root account). `<rag root>/kbs/<collection>/` holds only plain files waiting
    to move into a volume (a restored backup's, an unencrypted store's)."""

    def __init__(self, rag_root: Path, volumes: Path, mounts: Path, kek: KeyEncryptionKey) -> None:
        super().__init__(rag_root)
        self.volumes = volumes
        self.mounts = mounts
        self._kek = kek
        self._held: dict[str, int] = {}  # collection -> fd of its lock file, held shared
        self._lock = threading.Lock()

    def path(self, collection: str) -> Path:
        return self.mounts / super().path(collection).name

    def volume(self, collection: str) -> EncryptedVolume:
        return EncryptedVolume(self.volumes / collection, self.path(collection))

    def key_file(self, collection: str) -> Path:
        self.path(collection)  # checks the name
        return self.volumes / f"{collection}{_KEY_SUFFIX}"

    def collections(self) -> set[str]:
        return _named_dirs(self.volumes) | super().collections()

    def open(self, collection: str, *, create: bool) -> Path | None:
        volume = self.volume(collection)
        with self._lock:
            if collection in self._held:
                return volume.mount_dir
            fd = self._lock_fd(collection)
            try:
                while True:
                    # Mounted already (by another process, or one that crashed): shared use.
                    _flock(fd, fcntl.LOCK_SH, f"open {volume.cipher_dir}")
                    if _serving(volume) and not self._plain(collection).exists():
                        break
                    _flock(fd, fcntl.LOCK_EX, f"mount {volume.cipher_dir}")
                    if volume.mounted() and not _serving(volume):
                        volume.unmount()  # its daemon died (killed, out of memory): mount again
                    if self._holds_plain_files(collection):
                        self._adopt(collection)
                    if not volume.exists():
                        if not create:
                            os.close(fd)
                            return None
                        self._make(collection)
                    volume.mount(self._data_key(collection))
                    # Not atomic: another process may unmount between the two; then again.
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    if volume.mounted():
                        break
            except BaseException:
                os.close(fd)
                raise
            self._held[collection] = fd
            return volume.mount_dir

    def close(self, collection: str) -> None:
        with self._lock:
            fd = self._held.pop(collection, None)
            if fd is None:
                return
            try:
                # Another process holding it shared keeps it mounted: it unmounts at its close.
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _unmount(self.volume(collection))
            finally:
                os.close(fd)

    def close_all(self) -> None:
        for collection in list(self._held):
            self.close(collection)

    def destroy(self, collection: str) -> None:
        """Unmount the volume, destroy its key (overwritten, synced, unlinked), then delete its
        ciphertext: without the key, a copy of the ciphertext opens with nothing left here."""
        volume = self.volume(collection)
        with self._lock:
            fd = self._held.pop(collection, None)
            fd = self._lock_fd(collection) if fd is None else fd
            try:
                _flock(fd, fcntl.LOCK_EX, f"delete {volume.cipher_dir}")
                volume.unmount()
                shred(self.key_file(collection))
                volume.destroy()
                # Plain files of it not yet moved into a volume go too.
                shutil.rmtree(volume.mount_dir, ignore_errors=True)
                shutil.rmtree(self._waiting(collection), ignore_errors=True)
                shutil.rmtree(self._plain(collection), ignore_errors=True)
                self._lock_file(collection).unlink(missing_ok=True)
            finally:
                os.close(fd)

    def _holds_plain_files(self, collection: str) -> bool:
        """Whether the knowledge base has files in the clear to move into its volume: a restored
        backup's, a store's from before data at rest was encrypted, an interrupted move's."""
        if self._plain(collection).exists():
            return True
        path = self._waiting(collection)
        # Mounted: an older version's volume of it, inside the data volume (closed with it).
        return path.is_dir() and not is_mounted(path) and any(path.iterdir())

    def _adopt(self, collection: str) -> None:
        """Move the knowledge base's plain files into a new volume of its own. The files are
        first renamed aside, so a crash at any point leaves them whole there and the next open
        starts again (with another new volume)."""
        volume, plain = self.volume(collection), self._plain(collection)
        log.info("moving the files of knowledge base %s into an encrypted volume", collection)
        if not plain.exists():
            self._waiting(collection).rename(plain)
        volume.unmount()
        shutil.rmtree(volume.cipher_dir, ignore_errors=True)
        self._make(collection)
        volume.mount(self._data_key(collection))
        shutil.copytree(plain, volume.mount_dir, dirs_exist_ok=True)
        shutil.rmtree(plain)

    def _waiting(self, collection: str) -> Path:
        """Where plain files of the knowledge base wait to move into its volume: where an
        unencrypted store keeps them (and a restore puts them)."""
        return super().path(collection)

    def _plain(self, collection: str) -> Path:
        # A hidden name: not a collection's, so never listed or opened as one.
        return self.root / f".{collection}.plain"

    def _make(self, collection: str) -> None:
        """A new volume with a new key. What a crash left of an earlier try (a key without its
        volume, a half-made volume) holds no data yet and goes first."""
        volume = self.volume(collection)
        shred(self.key_file(collection))
        shutil.rmtree(volume.cipher_dir, ignore_errors=True)
        key = new_data_key()
        wrapped = wrap_data_key(self._kek, key, key_context(collection))
        _write_durably(self.key_file(collection), json.dumps(wrapped).encode())
        volume.create(key)

    def _data_key(self, collection: str) -> bytes:
        path = self.key_file(collection)
        try:
            wrapped = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise KnowledgeBaseError(
                f"the key of the encrypted knowledge base {collection} ({path}) is missing: "
                "its data cannot be read"
            ) from None
        except ValueError:
            raise KnowledgeBaseError(f"{path} does not hold a wrapped key") from None
        try:
            return unwrap_data_key(self._kek, wrapped, key_context(collection))
        except KeyWrapError as exc:
            raise KnowledgeBaseError(f"{path}: {exc}") from None

    def _lock_file(self, collection: str) -> Path:
        self.path(collection)
        return self.volumes / f"{collection}{_LOCK_SUFFIX}"

    def _lock_fd(self, collection: str) -> int:
        self.volumes.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.open(self._lock_file(collection), os.O_CREAT | os.O_RDWR, 0o600)


@contextlib.contextmanager
def all_open(dirs: KnowledgeBaseDirs) -> Iterator[None]:
    """Every knowledge base's directory open (its volume mounted) while held: what a backup
    copies. Closed after, so volumes nobody else uses are unmounted again."""
    opened = []
    try:
        for collection in sorted(dirs.collections()):
            if dirs.open(collection, create=False) is not None:
                opened.append(collection)
        yield
    finally:
        for collection in opened:
            dirs.close(collection)


def rewrap_keys(volumes: Path, old: KeyEncryptionKey, new: KeyEncryptionKey) -> int:
    """Wrap every knowledge base's key in `volumes` by `new` instead of `old` (key rotation: the
    volumes are not re-encrypted); returns how many. Each file is replaced in one rename, and
    the old wrap shredded, so once `old` is destroyed, no copy of a deleted knowledge base's
    wrapped key that a journal kept opens anything."""
    count = 0
    for path in sorted(volumes.glob(f"*{_KEY_SUFFIX}")) if volumes.is_dir() else []:
        collection = path.name.removesuffix(_KEY_SUFFIX)
        wrapped = json.loads(path.read_bytes())
        rewrapped = rewrap_data_key(old, new, wrapped, key_context(collection))
        fresh = path.with_name(f".{path.name}.new")
        fresh.unlink(missing_ok=True)
        _write_durably(fresh, json.dumps(rewrapped).encode())
        shred_copy = path.with_name(f".{path.name}.old")
        os.link(path, shred_copy)
        os.replace(fresh, path)
        shred(shred_copy)
        count += 1
    return count


def shred(path: Path) -> None:
    """Overwrite the file with random bytes, sync, unlink it and sync its folder: the old bytes
    leave the file system's current view (journals and flash may keep copies: docs/security.md)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        os.write(fd, os.urandom(max(os.fstat(fd).st_size, 1)))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    _sync_dir(path.parent)


def _write_durably(path: Path, data: bytes) -> None:
    """A new 0600 file, synced with its folder before the volume it opens gets any data."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named_dirs(parent: Path) -> set[str]:
    if not parent.is_dir():
        return set()
    # The listing's own file types: no stat of a mount point (a dead one answers ENOTCONN).
    with os.scandir(parent) as entries:
        return {
            e.name
            for e in entries
            if e.is_dir(follow_symlinks=False) and _COLLECTION.fullmatch(e.name)
        }


def _flock(fd: int, operation: int, doing: str) -> None:
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise KnowledgeBaseError(
                    f"cannot {doing}: another process used it for {LOCK_TIMEOUT_S:g} s"
                ) from None
            time.sleep(0.05)


def _serving(volume: EncryptedVolume) -> bool:
    """Mounted, with its gocryptfs daemon alive (a dead one's mount answers ENOTCONN)."""
    if not volume.mounted():
        return False
    try:
        os.stat(volume.mount_dir)
    except OSError:
        return False
    return True


def _unmount(volume: EncryptedVolume) -> None:
    """Unmount, waiting a moment for files the closed Chroma client still holds."""
    for _ in range(UNMOUNT_TRIES):
        gc.collect()  # a Collection object keeps its client's files open until collected
        try:
            volume.unmount()
            return
        except VolumeError:
            time.sleep(UNMOUNT_PAUSE_S)
    log.warning("%s stays mounted: files in it are still open", volume.mount_dir)
