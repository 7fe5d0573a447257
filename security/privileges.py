"""Running a service as an unprivileged account: hand it the state it writes, then give up root
for good (real, effective and saved ids, and supplementary groups)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from pathlib import Path

from appliance.security.gocryptfs import mount_points

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.state_version import schema_path


class PrivilegeError(ApplianceError):
    """The service account is missing, or root could not be given up."""


def service_dirs(settings: ApplianceSettings) -> list[Path]:
    """What the services (and the jobs they submit) write or must read alone: everything under
    the state directory except the local Slurm cluster's own files, which stay root's."""
    keys = settings.api_keys_file.parent
    layout = settings.layout
    # Encrypted, the user content is inside the data volume's mount point (its account's, as is
    # its ciphertext), which the volume, once open, keeps even from root; the knowledge bases'
    # volumes are mounted by that account in folders of its own beside it.
    user_content = (
        [layout.vault, layout.data, layout.kb_volumes, layout.kb_mounts]
        if layout.encrypted
        else [
            settings.rag_dir,
            settings.conversations_dir,
            settings.webapp_dir,
            settings.training_dir,
        ]
    )
    return [
        keys,
        settings.kek_file.parent,
        settings.signing_key_file.parent,
        settings.audit_dir,
        settings.layout.usage_db.parent,
        settings.log_dir,
        settings.instances_dir,
        *user_content,
        settings.tls_files[0].parent,
        settings.models_dir,
        settings.store_root,
        settings.layout.run,
        service_home(settings),
    ]


def service_home(settings: ApplianceSettings) -> Path:
    """HOME of the services and their jobs (caches of vLLM and torch): a system account usually
    has no home of its own."""
    return settings.layout.service_home


def hand_over(settings: ApplianceSettings, account: pwd.struct_passwd) -> None:
    """Make the service directories (created if missing) and everything in them the account's.
    Symlinks are changed themselves, never followed: a link planted in a service directory
    cannot hand the account a file elsewhere."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # The account's alone: other local accounts may not even list it (root still passes).
    os.chown(settings.state_dir, account.pw_uid, account.pw_gid, follow_symlinks=False)
    os.chmod(settings.state_dir, 0o700)
    # Beside them: the catalog the installer wrote (the services read it, `models add` writes
    # it) and the schema record (the services check it before they start).
    for path in (settings.user_catalog_file, schema_path(settings.state_dir)):
        if path.is_file() and not path.is_symlink():
            os.chown(path, account.pw_uid, account.pw_gid)
    # The backups an upgrade took as root: the next `appliance upgrade` runs as the account.
    backups = [settings.layout.backups] if settings.layout.backups.is_dir() else []
    # Open volumes (the data volume, knowledge bases'): their files are the account's already,
    # and their mounts answer it alone, even root's lstat.
    mounted = mount_points(Path("/proc/self/mountinfo").read_text())
    for top in dict.fromkeys([*service_dirs(settings), *backups]):
        if top.resolve() in mounted:
            continue
        top.mkdir(parents=True, exist_ok=True)
        for root, dirs, files in os.walk(top):
            real = Path(root).resolve()
            dirs[:] = [d for d in dirs if real / d not in mounted]
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                info = os.lstat(name)
                if (info.st_uid, info.st_gid) != (account.pw_uid, account.pw_gid):
                    os.chown(name, account.pw_uid, account.pw_gid, follow_symlinks=False)


def drop_to(user: str, home: Path) -> pwd.struct_passwd:
    """Become `user` (with `home` as HOME) for the rest of this process; raises if root could
    be regained."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"service account {user!r} does not exist (the installer creates it; or "
            f"`useradd --system --no-create-home {user}`)"
        ) from None
    if account.pw_uid == 0:
        raise PrivilegeError(f"service account {user!r} is root; choose an unprivileged one")
    os.setgroups(os.getgrouplist(user, account.pw_gid))
    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel refused to drop the saved id
        raise PrivilegeError("root could be regained after dropping privileges")
    # root's PATH may name directories the account cannot enter (/root/...): a missing program
    # then fails with "permission denied" instead of "not found". Keep the entries it can use.
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and _enterable(d)]
    os.environ.update(HOME=str(home), USER=user, LOGNAME=user, PATH=os.pathsep.join(path))
    os.umask(0o077)
    return account


def in_account(user: str, home: Path, work: Callable[[], bytes]) -> bytes:
    """Run `work` in a child process that became `user` (drop_to) and return the bytes it
    returned; an ApplianceError or OSError it raised comes back as an ApplianceError with its
    message. For root's commands that must read what only that account may: a data volume its
    services hold open. Only bytes come back (never pickles: the child is that account's)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(read_fd)
        try:
            drop_to(user, home)
            answer = b"+" + work()
        except (ApplianceError, OSError) as exc:
            answer = b"-" + str(exc).encode()
        except BaseException as exc:
            answer = b"-" + f"{type(exc).__name__}: {exc}".encode()
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(answer)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    if answer[:1] == b"+":
        return answer[1:]
    said = answer[1:].decode(errors="replace") or "it ended without a word"
    raise PrivilegeError(f"{said} (as {user})")


def _enterable(directory: str) -> bool:
    return os.access(directory, os.X_OK)


def run_as_service_user(settings: ApplianceSettings) -> None:
    """If this process is root and a service account is configured, hand it the state and
    become it. Anyone else keeps running as they are."""
    user = settings.security.service_user
    if user is None or os.geteuid() != 0:
        return
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        account = None
    if account is not None:
        hand_over(settings, account)
    drop_to(user, service_home(settings))
