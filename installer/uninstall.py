"""`appliance uninstall`: removes what the installer added (its files, services, Python
environment, and the Debian packages and account it created); user data stays unless purged."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from appliance.installer.layout import InstallLayout
from appliance.installer.manifest import Manifest


def uninstall(settings, services, *, purge: bool, keep_packages: bool) -> Iterator[str]:
    """Undo the installation step by step, saying what each step removed."""
    manifest_file = settings.config_file.parent / "install-manifest.json"
    manifest = Manifest.load(manifest_file)
    layout = InstallLayout(Path(manifest.prefix))
    services.stop()
    yield "services stopped"
    if manifest.service_mode == "systemd":
        # The nodes' standbys too where serving.standby was turned off (stopped, maybe enabled).
        for unit in services.installed_units:
            subprocess.run(["systemctl", "disable", unit], capture_output=True, check=False)
    for name in manifest.files:
        Path(name).unlink(missing_ok=True)
    if manifest.service_mode == "systemd":
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, check=False)
    yield f"removed {len(manifest.files)} files it wrote (configuration, Slurm, units, command)"
    # Generated state: the local cluster's configuration and spool, instance records, pid files,
    # this host's standby and store sockets (a stopped service removes its own; one that was
    # killed not).
    for path in (settings.slurm_dir, settings.instances_dir, layout.etc / "tls"):
        shutil.rmtree(path, ignore_errors=True)
    for pidfile in settings.state_dir.glob("*.pid"):
        pidfile.unlink(missing_ok=True)
    for node in settings.serving.standby_nodes:
        settings.standby_socket(node).unlink(missing_ok=True)
        settings.layout.store_socket(node).unlink(missing_ok=True)
    if manifest.packages_installed and not keep_packages:
        done = subprocess.run(
            ["apt-get", "remove", "-y", "-q", *manifest.packages_installed],
            capture_output=True,
            text=True,
            check=False,
        )
        yield (
            f"removed Debian packages {', '.join(manifest.packages_installed)}"
            if done.returncode == 0
            else f"apt-get remove failed: {done.stderr.strip()}"
        )
    if purge:
        shutil.rmtree(settings.state_dir, ignore_errors=True)
        yield f"deleted all data in {settings.state_dir}"
        if manifest.service_user_created and manifest.service_user:
            subprocess.run(["userdel", manifest.service_user], capture_output=True, check=False)
            yield f"removed the account {manifest.service_user}"
    else:
        yield (
            f"kept user data in {settings.state_dir} (model store, keys, accounts, knowledge "
            "bases, audit log, logs); `appliance uninstall --purge` deletes it"
        )
    manifest_file.unlink(missing_ok=True)
    _remove_if_empty(layout.etc)
    # Last: this very program runs from the environment (its modules are already loaded).
    shutil.rmtree(layout.venv, ignore_errors=True)
    _remove_if_empty(layout.venv.parent)
    yield f"removed the Python environment {layout.venv}"


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()
