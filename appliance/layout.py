"""Where the appliance keeps its files under its state directory (today: the local Slurm
cluster's, everything under one directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Unix socket paths are limited to 107 bytes; slurmstepd puts one per job step in the node's
# spool, named "<node>_<job id>.<step id>" (job ids up to 8 digits, step ids up to 10).
MAX_SOCKET_PATH = 107
_STEP_SOCKET_SUFFIX = len("_12345678.4294967291")


@dataclass(frozen=True)
class LocalClusterPaths:
    """The layout of ``<state_dir>/slurm``: configs, controller state, spools, logs, pid files."""

    root: Path

    @property
    def slurm_conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def health_check(self) -> Path:
        """The node health check Slurm runs (HealthCheckProgram)."""
        return self.root / "healthcheck.sh"

    @property
    def health_config(self) -> Path:
        """The settings the health check reads (written at `up`)."""
        return self.root / "health-config.yaml"

    @property
    def cgroup_conf(self) -> Path:
        return self.root / "cgroup.conf"

    @property
    def gres_conf(self) -> Path:
        # Slurm reads gres.conf from the directory of slurm.conf; the name is fixed.
        return self.root / "gres.conf"

    @property
    def state(self) -> Path:
        """slurmctld's StateSaveLocation: jobs, node states (drains survive restarts here)."""
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def node_spool(self, node: str) -> Path:
        return self.spool / node

    def step_socket_length(self, node: str) -> int:
        """Length of the longest job-step socket path slurmstepd will create for `node`."""
        return len(str(self.node_spool(node))) + 1 + len(node) + _STEP_SOCKET_SUFFIX

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def run(self) -> Path:
        """Pid files."""
        return self.root / "run"

    @property
    def dev(self) -> Path:
        """Character devices standing in for GPUs, one directory per node."""
        return self.root / "dev"

    def gpu_device(self, node: str, index: int) -> Path:
        return self.dev / node / f"gpu{index}"

    def daemon_output(self, daemon: str) -> Path:
        """A daemon's stdout/stderr: a copy of its log plus errors from before the log opens."""
        return self.log / f"{daemon}.out"
