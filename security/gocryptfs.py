"""A thin client around gocryptfs: one encrypted volume, its ciphertext in one directory and its
plaintext seen at a mount point while mounted, keyed by a 32-byte secret that only ever travels
on gocryptfs's standard input (never on a command line, in the environment or on disk)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError

GOCRYPTFS = "gocryptfs"
FUSERMOUNT = "fusermount3"
KEY_BYTES = 32
# The key is 256 random bits already, so scrypt's work factor buys nothing but start-up time
# (gocryptfs's default costs about a second per mount).
SCRYPT_LOG_N = 10
# gocryptfs's exit statuses (its exitcodes package).
EXIT_NOT_EMPTY = 10
EXIT_WRONG_KEY = 12
CONFIG_FILE = "gocryptfs.conf"
TIMEOUT_S = 60.0


class VolumeError(ApplianceError):
    """An encrypted volume could not be made, mounted or unmounted; the message says why."""


class WrongVolumeKey(VolumeError):
    """The key given is not the volume's."""


def mount_points(mountinfo: str) -> set[Path]:
    """The mount points listed in /proc/self/mountinfo's text (field 5, octal-escaped)."""
    points = set()
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            raw = fields[4].encode()
            points.add(Path(raw.decode("unicode_escape").encode("latin-1").decode()))
    return points


def is_mounted(path: Path) -> bool:
    """Whether a file system is mounted at `path` (as this process's mount namespace sees it)."""
    return path.resolve() in mount_points(Path("/proc/self/mountinfo").read_text())


def mounts_under(path: Path) -> list[Path]:
    """The mount points strictly inside `path`, deepest first (the order to unmount them)."""
    top = path.resolve()
    inside = [p for p in mount_points(Path("/proc/self/mountinfo").read_text()) if p != top]
    return sorted((p for p in inside if p.is_relative_to(top)), key=lambda p: -len(p.parts))


def unmount_at(path: Path) -> None:
    """Unmount the FUSE file system at `path`; VolumeError while files are open in it."""
    _run(FUSERMOUNT, ["-u", str(path)], None, f"unmount {path}")


@dataclass(frozen=True)
class EncryptedVolume:
    """One gocryptfs volume: ciphertext in `cipher_dir`, plaintext at `mount_dir` while mounted.
    The mount outlives this process (gocryptfs runs as its own daemon) until `unmount`."""

    cipher_dir: Path
    mount_dir: Path

    def exists(self) -> bool:
        return (self.cipher_dir / CONFIG_FILE).is_file()

    def mounted(self) -> bool:
        return is_mounted(self.mount_dir)

    def create(self, key: bytes) -> None:
        """Make the volume, keyed by `key`; refuses a directory that holds anything."""
        _check_key(key)
        self.cipher_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(self.cipher_dir.iterdir()):
            raise VolumeError(f"{self.cipher_dir} is not empty: it cannot become a new volume")
        args = ["-init", "-q", "-scryptn", str(SCRYPT_LOG_N), str(self.cipher_dir)]
        _run(GOCRYPTFS, args, key, f"make the encrypted volume {self.cipher_dir}")

    def mount(self, key: bytes) -> None:
        """Mount the volume at `mount_dir` (made if missing); nothing to do if it is mounted.
        WrongVolumeKey when `key` does not open it."""
        _check_key(key)
        if self.mounted():  # gocryptfs would stack a second mount on the first
            return
        if not self.exists():
            raise VolumeError(f"{self.cipher_dir} holds no encrypted volume")
        self.mount_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # -kernel_cache keeps the page cache across opens (FOPEN_KEEP_CACHE): safe, since
        # nothing changes the ciphertext but this mount, and SQLite opening a database per
        # query (the keyword index) then rereads it from memory: open and query 3.8 -> 3.2 ms
        # against 0.5 ms plain, on 2 cores at load 10 (docs/security.md).
        args = ["-q", "-nosyslog", "-kernel_cache", str(self.cipher_dir), str(self.mount_dir)]
        _run(GOCRYPTFS, args, key, f"mount the encrypted volume {self.cipher_dir}")

    def unmount(self) -> None:
        """Unmount it; nothing to do if it is not mounted. VolumeError while files are open."""
        if self.mounted():
            unmount_at(self.mount_dir)

    def destroy(self) -> None:
        """Unmount it and delete its ciphertext. Unrecoverable only once its key is gone too."""
        self.unmount()
        shutil.rmtree(self.cipher_dir, ignore_errors=True)
        if self.mount_dir.is_dir() and not any(self.mount_dir.iterdir()):
            self.mount_dir.rmdir()


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise VolumeError(f"a volume key has {KEY_BYTES} bytes, not {len(key)}")


def _run(program: str, args: list[str], key: bytes | None, doing: str) -> None:
    if shutil.which(program) is None:
        raise VolumeError(f"cannot {doing}: {program} is not installed (Debian: gocryptfs, fuse3)")
    # Its output goes to a file, not a pipe: the daemon a mount leaves behind inherits it, and
    # a pipe would stay open, and be waited for, as long as the mount.
    with tempfile.TemporaryFile() as output:
        try:
            done = subprocess.run(
                [program, *args],
                # The password is the key's hex: gocryptfs reads one line from a stdin that is
                # no terminal.
                input=key.hex().encode() if key is not None else b"",
                stdout=output,
                stderr=output,
                timeout=TIMEOUT_S,
                env={**os.environ, "LC_ALL": "C"},
            )
        except subprocess.TimeoutExpired:
            message = f"cannot {doing}: {program} did not finish in {TIMEOUT_S:g} s"
            raise VolumeError(message) from None
        output.seek(0)
        said = output.read(64 * 1024).decode(errors="replace").strip().splitlines()
    if done.returncode == 0:
        return
    detail = said[-1] if said else f"exit status {done.returncode}"
    if program == GOCRYPTFS and done.returncode == EXIT_WRONG_KEY:
        raise WrongVolumeKey(f"cannot {doing}: the key is not this volume's")
    if program == GOCRYPTFS and done.returncode == EXIT_NOT_EMPTY:
        detail = "the mount point is not empty"
    raise VolumeError(f"cannot {doing}: {detail}")
