"""Configuration of the Slurm cluster that runs every GPU workload."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.names import (
    BATCH_PARTITION,
    GRACE_S,
    PREEMPTIBLE_PARTITION,
    SERVING_PARTITION,
)


class ClusterSettings(BaseModel):
    """Which Slurm cluster runs the instances, and the shape of the local one the stack starts."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    mode: Literal["local", "existing"] = "local"
    """`local`: the stack writes slurm.conf and runs its own slurmctld/slurmd on this host
    (`appliance cluster up`). `existing`: use a site's Slurm cluster (see `slurm_conf`)."""

    name: str = Field(default="appliance", pattern=r"^[a-z][a-z0-9_-]{0,39}$")
    """Slurm ClusterName; also prefixes the names of the jobs the stack submits."""

    slurm_conf: Path | None = None
    """slurm.conf of an existing cluster (mode `existing`). Unset: Slurm's own default."""

    plugin_dir: Path | None = None
    """Slurm's plugin directory (slurm.conf PluginDir), absolute, for a local cluster whose Slurm
    is not installed where it was built for, e.g. packages unpacked into a folder with `dpkg -x`
    (then also put that folder's programs on PATH and its libraries on LD_LIBRARY_PATH). Unset:
    the directory Slurm was built with."""

    auth: Literal["none", "munge"] = "none"
    """How the Slurm daemons authenticate each other and users. `munge` (munged must run, as
    the installer sets it up) for every real cluster; `none` only for a single-host demo, where
    any local account could submit jobs as any other."""

    cgroups: bool = False
    """Confine jobs with cgroups (CPU cores, memory, GPU devices; writes cgroup.conf). Needs a
    delegated cgroup tree, as systemd provides; off in containers without one."""

    partition: str = Field(default=SERVING_PARTITION, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Partition of the instances that batch work must not take away: a model's first
    `min_instances` instances, and every instance while preemptible serving is off. Training jobs
    run here too."""

    preemptible_partition: str | None = Field(
        default=PREEMPTIBLE_PARTITION, pattern=r"^[A-Za-z0-9_.-]{1,64}$"
    )
    """Low-priority partition for instances above a model's `min_instances` when the model (or
    `serving.preemptible`) allows it: batch jobs preempt them, after `preempt_grace_s`, and the
    gateway moves their running requests to other instances first. Unset: no preemptible
    serving."""

    preempt_grace_s: int = Field(default=GRACE_S, ge=5, le=3600)
    """Slurm GraceTime of the preemptible partition: seconds between the preemption signal and
    the kill. The gateway moves an instance's requests within it; a batch job waits at most this
    long (and usually only until the requests have moved)."""

    batch_partition: str | None = Field(default=BATCH_PARTITION, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The local cluster's default partition for ordinary batch work. Its jobs preempt
    preemptible instances and never the pinned ones (same priority tier as `partition`)."""

    nodes: int = Field(default=1, ge=1, le=64)
    """Number of slurmd nodes of the local cluster. Several nodes on one host simulate a real
    cluster (each slurmd runs with its own name and port), so placement is tested for real."""

    gpus_per_node: int = Field(default=0, ge=0, le=16)
    """Simulated GPUs per local node, backed by character device nodes so Slurm's GRES
    allocation works as on real hardware. 0 on a CPU-only host. Ignored when real GPUs are found."""

    shards_per_gpu: int = Field(default=4, ge=0, le=64)
    """GRES `shard` entries per GPU: how many instances of small models may share one GPU.
    0 disables sharing."""

    cpus_per_node: int | None = Field(default=None, ge=1, le=4096)
    """CPUs each local node offers. Unset: what `slurmd -C` detects on this host."""

    memory_mb_per_node: int | None = Field(default=None, ge=256)
    """Memory (MB) each local node offers. Unset: what `slurmd -C` detects, less a reserve for the
    gateway and the Slurm daemons."""

    controller_port: int = Field(default=16817, ge=1024, le=65535)
    """TCP port of the local slurmctld."""

    node_port_base: int = Field(default=17001, ge=1024, le=65000)
    """TCP port of the first local slurmd; node N listens on node_port_base + N - 1."""

    kill_wait_s: int = Field(default=5, ge=0, le=300)
    """Seconds between SIGTERM and SIGKILL when a job is cancelled (Slurm KillWait)."""

    ready_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long `appliance cluster up` waits for every node to become idle."""
