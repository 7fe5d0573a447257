"""Where an installation puts things, under a prefix (`/` for a real install)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InstallLayout:
    """Paths of one installation; with prefix `/` they are the standard system locations."""

    prefix: Path

    def _under(self, path: str) -> Path:
        return self.prefix / path.lstrip("/")

    @property
    def venv(self) -> Path:
        return self._under("/opt/appliance/venv")

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def etc(self) -> Path:
        return self._under("/etc/appliance")

    @property
    def config(self) -> Path:
        return self.etc / "config.yaml"

    @property
    def manifest(self) -> Path:
        """What the installer created (files, packages, accounts), for re-runs and uninstall."""
        return self.etc / "install-manifest.json"

    @property
    def state(self) -> Path:
        """User data: the model store, keys, knowledge bases, logs (kept by uninstall)."""
        return self._under("/var/lib/appliance")

    @property
    def command(self) -> Path:
        """`appliance` on the PATH, bound to this installation's configuration."""
        return self._under("/usr/local/bin/appliance")

    @property
    def systemd_dir(self) -> Path:
        return self._under("/etc/systemd/system")

    @property
    def slurm_etc(self) -> Path:
        """slurm.conf of a multi-node cluster (where Debian's slurmctld/slurmd units read it)."""
        return self._under("/etc/slurm")

    @property
    def slurmd_defaults(self) -> Path:
        """Options of Debian's slurmd unit (a worker joins its head with them)."""
        return self._under("/etc/default/slurmd")

    @property
    def munge_key(self) -> Path:
        return self._under("/etc/munge/munge.key")

    @property
    def tls_cert(self) -> Path:
        return self.etc / "tls" / "server.crt"

    @property
    def tls_key(self) -> Path:
        return self.etc / "tls" / "server.key"
