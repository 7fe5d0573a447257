"""The memory a local Slurm node offers its jobs: the host's, less what the appliance keeps back
(importable without the stack's packages: the installer uses it before they are installed)."""

from __future__ import annotations

# Memory kept back for the gateway, the Slurm daemons and the OS when the node size is derived.
MEMORY_RESERVE_MB = 2048


def offered_memory_mb(real_memory_mb: int, kept_mb: int = 0) -> int:
    """`real_memory_mb` less the reserve and `kept_mb` (e.g. the store's host tier), never below
    half of it."""
    return max(real_memory_mb - MEMORY_RESERVE_MB - kept_mb, real_memory_mb // 2)
