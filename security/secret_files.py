"""Secret files (keys): written once with mode 0600, read only when nobody else can reach them."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from appliance.errors import ApplianceError

# Any permission bit for group or others makes a secret file unsafe to trust.
_LOOSE_BITS = 0o077


class SecretFileError(ApplianceError):
    """A secret file is missing, already exists, has loose permissions or the wrong size."""


def write_secret_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` holding `data`, mode 0600; refuse to replace an existing file."""
    p = Path(path)
    try:
        # O_EXCL: an existing key is never overwritten (losing a key loses the data it protects);
        # it also refuses to follow a symlink planted at the path.
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise SecretFileError(f"{p} already exists; refusing to overwrite it") from None
    except FileNotFoundError:
        raise SecretFileError(f"cannot create {p}: its directory does not exist") from None
    except PermissionError:
        raise SecretFileError(f"cannot create {p}: permission denied") from None
    try:
        # The umask can only remove bits, but be explicit: the mode must be exactly 0600.
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        # A half-written key file would be refused later anyway; do not leave it behind.
        with contextlib.suppress(OSError):
            p.unlink()
        raise
    os.close(fd)


def replace_secret_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `path` (mode 0600) atomically: readers see the old file or the new one, never half."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write_secret_file(tmp, data)
    if os.geteuid() == 0:
        # root editing a service's file (`appliance keys create` on an installed system, the
        # installer) keeps it the service's: the owner of the file it replaces, or of its folder.
        try:
            owner = p.lstat()
        except FileNotFoundError:
            owner = p.parent.stat()
        os.chown(tmp, owner.st_uid, owner.st_gid)
    os.replace(tmp, p)


def read_secret_file(path: str | os.PathLike[str], *, size: int, what: str = "key file") -> bytes:
    """The `size` bytes of a secret file that only its owner can read or write."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        raise SecretFileError(f"{what} {p} does not exist") from None
    except PermissionError:
        raise SecretFileError(f"cannot read {what} {p}: permission denied") from None
    try:
        # fstat the open descriptor: the file checked is the file read, even if renamed meanwhile.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{what} {p} is not a regular file")
        if st.st_mode & _LOOSE_BITS:
            mode = stat.S_IMODE(st.st_mode)
            raise SecretFileError(
                f"{what} {p} is readable or writable by group or others (mode {mode:04o}); "
                f"run: chmod 600 {p}"
            )
        if st.st_size != size:
            raise SecretFileError(
                f"{what} {p} holds {st.st_size} bytes; it must hold exactly {size}"
            )
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    if len(data) != size:
        raise SecretFileError(f"{what} {p} holds {len(data)} bytes; it must hold exactly {size}")
    return data
