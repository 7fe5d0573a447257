"""Render slurm.conf and gres.conf for the local cluster from the settings and the host's facts.

Everything here is a pure function of its arguments (detection is separate), so golden-file tests
pin the output byte for byte (tests/unit/golden/slurm-*.conf; regenerate them with
``APPLIANCE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_slurm_conf.py``).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from appliance.config.cluster import ClusterSettings
from appliance.errors import ApplianceError
from appliance.layout import LocalClusterPaths
from appliance.names import local_node_names
from appliance.slurm.cgroup import CGROUP_CONF_BODY
from appliance.slurm.node_memory import offered_memory_mb
from appliance.slurm.partitions import partition_lines, preemption_lines
from appliance.slurm.runner import CommandError, CommandRunner

# Slurm's default memory per allocated CPU; without it a job takes its node's whole memory and
# jobs run one at a time.
DEF_MEM_PER_CPU_MB = 1000
# Real GPUs are plain NVIDIA device files; their index in `nvidia-smi -L` is their minor number.
NVIDIA_DEVICE = "/dev/nvidia{index}"


@dataclass(frozen=True)
class HostFacts:
    """What the host offers, as Slurm itself sees it (`slurmd -C`) plus any real GPUs."""

    hostname: str
    cpus: int
    real_memory_mb: int
    gpu_devices: tuple[str, ...] = ()
    """Device files of real GPUs (``/dev/nvidia0``...); empty on a host without GPUs."""
    user: str = "root"
    """Account the Slurm daemons run as (SlurmUser)."""


@dataclass(frozen=True)
class NodePlan:
    """One slurmd of the local cluster."""

    name: str
    port: int
    cpus: int
    memory_mb: int
    gpu_files: tuple[str, ...]


@dataclass(frozen=True)
class ClusterLayout:
    """The nodes of the local cluster and whether their GPUs are simulated."""

    nodes: tuple[NodePlan, ...]
    simulated_gpus: bool
    shards_per_gpu: int

    @property
    def has_gpus(self) -> bool:
        return any(n.gpu_files for n in self.nodes)

    @property
    def sharing(self) -> bool:
        return self.has_gpus and self.shards_per_gpu > 0


# -- detection --------------------------------------------------------------------------------


def parse_slurmd_c(text: str) -> tuple[str, int, int]:
    """``slurmd -C`` output -> (node name, CPUs, RealMemory MB)."""
    fields = dict(re.findall(r"(\w+)=(\S+)", text))
    try:
        return fields["NodeName"], int(fields["CPUs"]), int(fields["RealMemory"])
    except (KeyError, ValueError):
        raise ApplianceError(f"could not read `slurmd -C` output: {text.strip()!r}") from None


def parse_nvidia_smi_l(text: str) -> list[int]:
    """Indices of the GPUs that ``nvidia-smi -L`` lists (``GPU 0: NVIDIA H100 ...``)."""
    return [int(m) for m in re.findall(r"^GPU (\d+):", text, flags=re.MULTILINE)]


def detect_host_facts(runner: CommandRunner, user: str = "root") -> HostFacts:
    """Ask Slurm what this host offers, and nvidia-smi which GPUs it has (none if it is absent)."""
    try:
        result = runner.run(["slurmd", "-C"], timeout=30)
    except CommandError as exc:
        raise ApplianceError(f"cannot detect this host's CPUs and memory: {exc}") from None
    if not result.ok:
        raise ApplianceError(
            f"`slurmd -C` failed (exit {result.returncode}): {result.stderr.strip()}"
        )
    name, cpus, memory = parse_slurmd_c(result.stdout)
    gpus: list[int] = []
    try:
        smi = runner.run(["nvidia-smi", "-L"], timeout=30)
        if smi.ok:
            gpus = parse_nvidia_smi_l(smi.stdout)
    except CommandError:
        pass  # no NVIDIA driver: a CPU host, GPUs are simulated if configured
    return HostFacts(
        hostname=name or socket.gethostname().split(".")[0],
        cpus=cpus,
        real_memory_mb=memory,
        gpu_devices=tuple(NVIDIA_DEVICE.format(index=i) for i in gpus),
        user=user,
    )


# -- planning ---------------------------------------------------------------------------------


def node_memory_mb(cluster: ClusterSettings, facts: HostFacts) -> int:
    """Configured memory, or detected less the reserve; never more than `slurmd -C` reports
    (slurmd drains a node whose RealMemory exceeds the hardware)."""
    if cluster.memory_mb_per_node is not None:
        return min(cluster.memory_mb_per_node, facts.real_memory_mb)
    return offered_memory_mb(facts.real_memory_mb)


def plan_cluster(cluster: ClusterSettings, slurm_dir: Path, facts: HostFacts) -> ClusterLayout:
    """Names, ports, sizes and GPU device files of the local cluster's nodes."""
    paths = LocalClusterPaths(slurm_dir)
    cpus = cluster.cpus_per_node or facts.cpus
    if cpus > facts.cpus:
        raise ApplianceError(
            f"cluster.cpus_per_node is {cpus} but this host has {facts.cpus} CPUs (slurmd would "
            f"drain the node); set cluster.cpus_per_node to at most {facts.cpus} or leave it unset"
        )
    memory = node_memory_mb(cluster, facts)
    names = local_node_names(cluster.nodes)
    simulated = not facts.gpu_devices
    if simulated:
        gpu_files = [
            tuple(str(paths.gpu_device(name, g)) for g in range(cluster.gpus_per_node))
            for name in names
        ]
    else:
        gpu_files = _split_real_gpus(facts.gpu_devices, len(names))
    nodes = tuple(
        NodePlan(
            name=name,
            port=cluster.node_port_base + i,
            cpus=cpus,
            memory_mb=memory,
            gpu_files=files,
        )
        for i, (name, files) in enumerate(zip(names, gpu_files, strict=True))
    )
    return ClusterLayout(
        nodes=nodes, simulated_gpus=simulated, shards_per_gpu=cluster.shards_per_gpu
    )


def _split_real_gpus(devices: tuple[str, ...], nodes: int) -> list[tuple[str, ...]]:
    # Each real GPU belongs to exactly one node; otherwise Slurm would hand one GPU to two jobs.
    per_node = len(devices) // nodes
    if per_node == 0:
        raise ApplianceError(
            f"this host has {len(devices)} GPU(s) but cluster.nodes is {nodes}: every local node "
            f"needs a GPU of its own; set cluster.nodes to at most {len(devices)}"
        )
    return [devices[i * per_node : (i + 1) * per_node] for i in range(nodes)]


# -- rendering --------------------------------------------------------------------------------

_HEADER = (
    "# Generated by appliance (appliance/slurm/conf.py) from the `cluster` settings.\n"
    "# Edits are overwritten by `appliance cluster up`; change the configuration instead.\n"
)


@dataclass(frozen=True)
class HealthCheck:
    """The node health check slurmd runs as root every `interval_s` (drains failing nodes)."""

    program: Path
    interval_s: int


def render_health_check_script(python: str, config: Path) -> str:
    """healthcheck.sh: Slurm runs a program without arguments, so this wraps the command."""
    return (
        "#!/bin/sh\n"
        "# Generated by appliance (appliance/slurm/conf.py): Slurm's HealthCheckProgram.\n"
        "# It drains this node when a check fails and resumes it when all pass again.\n"
        f'exec "{python}" -m appliance.cli.main --config "{config}" health-check --apply\n'
    )


def render_slurm_conf(
    cluster: ClusterSettings,
    slurm_dir: Path,
    facts: HostFacts,
    health_check: HealthCheck | None = None,
    prolog: Path | None = None,
) -> str:
    """slurm.conf of the local cluster: one controller and ``cluster.nodes`` slurmd on this host;
    `prolog`: the script each slurmd runs before a job (appliance/slurm/prolog.py), if any."""
    paths = LocalClusterPaths(slurm_dir)
    layout = plan_cluster(cluster, slurm_dir, facts)
    lines = [
        f"ClusterName={cluster.name}",
        f"SlurmctldHost={facts.hostname}",
        f"SlurmctldPort={cluster.controller_port}",
        f"SlurmUser={facts.user}",
        f"SlurmdUser={facts.user}",
        *([f"PluginDir={cluster.plugin_dir}"] if cluster.plugin_dir else []),
        *_auth_lines(cluster),
        f"StateSaveLocation={paths.state}",
        f"SlurmdSpoolDir={paths.spool}/%n",
        f"SlurmctldPidFile={paths.run}/slurmctld.pid",
        f"SlurmdPidFile={paths.run}/slurmd-%n.pid",
        f"SlurmctldLogFile={paths.log}/slurmctld.log",
        f"SlurmdLogFile={paths.log}/slurmd-%n.log",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={paths.log}/jobcomp.txt",
        "AccountingStorageType=accounting_storage/none",
        *_confinement_lines(cluster),
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        f"DefMemPerCPU={DEF_MEM_PER_CPU_MB}",
        "# A node that comes back after a crash becomes usable again without an admin.",
        "ReturnToService=2",
        f"KillWait={cluster.kill_wait_s}",
        *(preemption_lines() if cluster.preemptible_partition else []),
        "MpiDefault=none",
        "MailProg=/bin/true",
    ]
    if health_check is not None:
        lines += [
            f"HealthCheckProgram={health_check.program}",
            f"HealthCheckInterval={health_check.interval_s}",
            "# Checked in every state, so a drained node is resumed once it is healthy again.",
            "HealthCheckNodeState=ANY",
        ]
    if prolog is not None:
        lines.append(f"Prolog={prolog}")
    if layout.has_gpus:
        lines.append("GresTypes=gpu,shard" if layout.sharing else "GresTypes=gpu")
    for node in layout.nodes:
        line = (
            f"NodeName={node.name} NodeHostname={facts.hostname} NodeAddr=127.0.0.1 "
            f"Port={node.port} CPUs={node.cpus} RealMemory={node.memory_mb}"
        )
        gres = _node_gres(node, layout)
        if gres:
            line += f" Gres={gres}"
        lines.append(line + " State=UNKNOWN")
    lines += cluster_partition_lines(cluster)
    return _HEADER + "\n".join(lines) + "\n"


def cluster_partition_lines(cluster: ClusterSettings) -> list[str]:
    """The partitions `cluster` settings describe (batch, pinned and preemptible serving)."""
    return partition_lines(
        cluster.partition,
        cluster.preemptible_partition,
        cluster.preempt_grace_s,
        cluster.batch_partition,
    )


def _auth_lines(cluster: ClusterSettings) -> list[str]:
    if cluster.auth == "munge":
        return ["AuthType=auth/munge", "CredType=cred/munge"]
    return [
        "# No munge on a single host: the daemons trust each other.",
        "AuthType=auth/none",
        "CredType=cred/none",
    ]


def _confinement_lines(cluster: ClusterSettings) -> list[str]:
    if cluster.cgroups:
        return [
            "ProctrackType=proctrack/cgroup",
            "TaskPlugin=task/cgroup,task/affinity",
            "JobAcctGatherType=jobacct_gather/cgroup",
        ]
    # Without a delegated cgroup tree (containers, no systemd): plain process tracking.
    return ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none"]


# Without confinement slurmd still loads a cgroup plugin when it starts, and fails if that
# fails. Autodetection picks cgroup/v2 on a cgroup v2 host, whose start needs systemd over D-Bus
# (so slurmd fails in a container without systemd); cgroup/v1 starts without touching the cgroup
# tree on any host. (Slurm 22.05 has no CgroupPlugin=disabled.)
_UNCONFINED_CGROUP_CONF_BODY = (
    "# No confinement (cluster.cgroups is off): nothing uses this plugin, but slurmd loads one.\n"
    "CgroupPlugin=cgroup/v1\n"
)


def render_cgroup_conf(confine: bool = True) -> str:
    """cgroup.conf of the local cluster: confinement with `cluster.cgroups`, else only a cgroup
    plugin that slurmd can load on any host."""
    return _HEADER + (CGROUP_CONF_BODY if confine else _UNCONFINED_CGROUP_CONF_BODY)


def _node_gres(node: NodePlan, layout: ClusterLayout) -> str:
    count = len(node.gpu_files)
    if not count:
        return ""
    if layout.sharing:
        return f"gpu:{count},shard:{count * layout.shards_per_gpu}"
    return f"gpu:{count}"


def render_gres_conf(cluster: ClusterSettings, slurm_dir: Path, facts: HostFacts) -> str:
    """gres.conf: each GPU's device file per node and, with sharing, its shards."""
    layout = plan_cluster(cluster, slurm_dir, facts)
    # Autodetection would look for NVML and find nothing (or the wrong GPUs for simulated ones).
    lines = ["AutoDetect=off"]
    for node in layout.nodes:
        lines.extend(f"NodeName={node.name} Name=gpu File={f}" for f in node.gpu_files)
        if layout.sharing:
            # One shard line per GPU, so a shard job is tied to one GPU (CUDA_VISIBLE_DEVICES).
            lines.extend(
                f"NodeName={node.name} Name=shard Count={layout.shards_per_gpu} File={f}"
                for f in node.gpu_files
            )
    return _HEADER + "\n".join(lines) + "\n"
