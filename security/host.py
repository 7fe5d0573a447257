"""Host fingerprint: a stable id for this machine from its machine id and its GPUs' UUIDs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.slurm.runner import CommandError, CommandRunner, LocalRunner

MACHINE_ID_PATHS = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"]

# Exit status of a shell (e.g. a runner over SSH) for a command it cannot find.
_COMMAND_NOT_FOUND = 127


class HostError(ApplianceError):
    """This host's identity cannot be read (no machine id, nvidia-smi failing)."""


def host_fingerprint(machine_id: str, gpu_uuids: Sequence[str]) -> str:
    """'hf-' + 24 hex chars of sha256 over the machine id and the sorted GPU UUIDs."""
    # Sorted: nvidia-smi's order follows PCI enumeration, which may change across boots.
    lines = [machine_id.strip(), *sorted(u.strip() for u in gpu_uuids)]
    return "hf-" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:24]


def read_machine_id(paths: Sequence[Path] = MACHINE_ID_PATHS) -> str:
    """The systemd/D-Bus machine id of this host."""
    for path in paths:
        try:
            value = path.read_text().strip()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            continue
        if value:
            return value
    tried = " or ".join(str(p) for p in paths)
    raise HostError(
        f"cannot read this host's machine id from {tried}; "
        "create one with: systemd-machine-id-setup"
    )


def gpu_uuids(runner: CommandRunner) -> list[str]:
    """The UUIDs of this host's NVIDIA GPUs; [] when nvidia-smi is absent or sees no GPU."""
    try:
        result = runner.run(NVIDIA_SMI, timeout=30.0)
    except FileNotFoundError:
        return []
    except CommandError as exc:
        # LocalRunner reports a missing program as "failed: program not found".
        if "not found" in exc.reason:
            return []
        raise HostError(f"cannot list this host's GPUs: {exc}") from None
    text = result.stdout + result.stderr
    if result.returncode == _COMMAND_NOT_FOUND or "No devices were found" in text:
        return []
    if not result.ok:
        # A broken driver must not silently yield a GPU-less fingerprint (a different host id).
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise HostError(
            f"nvidia-smi failed with exit status {result.returncode}"
            + (f": {detail[-1]}" if detail else "")
        )
    uuids = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    odd = [u for u in uuids if not u.startswith(("GPU-", "MIG-"))]
    if odd:
        raise HostError(f"unexpected nvidia-smi output (not a GPU UUID): {odd[0]!r}")
    return uuids


def this_host_fingerprint(runner: CommandRunner | None = None) -> str:
    """The fingerprint of the host this runs on."""
    return host_fingerprint(read_machine_id(), gpu_uuids(runner or LocalRunner()))
