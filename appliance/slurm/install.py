"""Find Slurm's programs, and install Debian's slurm-wlm when they are missing (root only)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.slurm.runner import CommandError, CommandRunner

# What the local cluster runs: both daemons and the client tools the SlurmClient calls.
REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
PACKAGE = "slurm-wlm"
# Daemons live in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_DIRS = ("/usr/sbin", "/usr/local/sbin")
_INSTALL_HINT = f"apt-get update && apt-get install -y {PACKAGE}"


def find_program(name: str) -> str | None:
    """Absolute path of a program, looking in the sbin directories too."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _EXTRA_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def slurmstepd_beside(slurmd: str) -> str | None:
    """The slurmstepd installed with `slurmd` (in its directory, or in that of the file it links
    to), for ``slurmd -d``: slurmd otherwise runs the one at the path it was built with
    (/usr/sbin/slurmstepd for Debian's), which a copy unpacked elsewhere does not have."""
    for directory in (Path(slurmd).parent, Path(slurmd).resolve().parent):
        candidate = directory / "slurmstepd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_programs() -> list[str]:
    return [name for name in REQUIRED_PROGRAMS if find_program(name) is None]


def ensure_slurm_installed(runner: CommandRunner, *, is_root: bool | None = None) -> None:
    """Install slurm-wlm with apt-get if any Slurm program is missing; a clear error otherwise."""
    missing = missing_programs()
    if not missing:
        return
    is_root = os.geteuid() == 0 if is_root is None else is_root
    what = ", ".join(missing)
    if not is_root:
        raise ApplianceError(
            f"Slurm is not installed ({what} not found). Install it as root: `{_INSTALL_HINT}`, "
            "or run `appliance cluster up` as root, which installs it."
        )
    if find_program("apt-get") is None:
        raise ApplianceError(
            f"Slurm is not installed ({what} not found) and apt-get is not available: install "
            "Slurm 22.05 or later (slurmctld, slurmd, client tools) with the package manager."
        )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    for argv, timeout in (
        (["apt-get", "update"], 300.0),
        (["apt-get", "install", "-y", PACKAGE], 900.0),
    ):
        try:
            result = runner.run(argv, env=env, timeout=timeout)
        except CommandError as exc:
            raise ApplianceError(f"installing Slurm failed: {exc}") from None
        if not result.ok:
            raise ApplianceError(
                f"installing Slurm failed: `{' '.join(argv)}` exited with {result.returncode}:\n"
                f"{result.stderr.strip()[-2000:]}"
            )
    still = missing_programs()
    if still:
        raise ApplianceError(f"installed {PACKAGE} but {', '.join(still)} is still not found")
