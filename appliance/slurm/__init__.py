"""Slurm layer: a thin client around the Slurm CLI and the local cluster the stack can run."""

from appliance.slurm.client import SlurmClient, SlurmJob, SlurmNode
from appliance.slurm.runner import (
    CommandError,
    CommandResult,
    CommandRunner,
    LocalRunner,
    SlurmCommandError,
)

__all__ = [
    "CommandError",
    "CommandResult",
    "CommandRunner",
    "LocalRunner",
    "SlurmClient",
    "SlurmCommandError",
    "SlurmJob",
    "SlurmNode",
]
