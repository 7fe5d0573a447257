"""The text of every file the installer writes, as pure functions of the plan (golden-tested:
tests/unit/golden/installer/<profile>/).

Standard library only. The local cluster's slurm.conf and gres.conf come from
appliance/slurm/conf.py, which `appliance cluster up` also uses; the multi-node ones are here.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance.installer.plan import Plan

from appliance.layout import StateLayout
from appliance.slurm.cgroup import CGROUP_CONF_BODY
from appliance.slurm.node_memory import offered_memory_mb
from appliance.slurm.partitions import default_partition_lines, preemption_lines
from appliance.slurm.prolog import render_prolog_script

HEADER = "# Written by the appliance installer ({what}); re-running it rewrites this file.\n"
# Memory Slurm gives a job per allocated CPU unless the job asks (MB).
DEF_MEM_PER_CPU_MB = 2000
# Upper bound of dynamic nodes (workers register themselves, up to this many).
MAX_NODE_COUNT = 256
# Limits of every user and every key where a gateway runs (security.quotas; docs/security.md,
# "Quotas", says how to change them): room for a person's day of chat and knowledge-base work,
# not for one account taking a GPU's day (a small model on one GPU makes ~50M tokens a day).
QUOTAS = {"requests_per_minute": 120, "tokens_per_day": 2_000_000, "concurrent_streams": 8}


def _yaml_scalar(value) -> str:
    # JSON strings, numbers and booleans are valid YAML scalars.
    return json.dumps(str(value) if isinstance(value, Path) else value)


def render_config(plan: Plan) -> str:
    """/etc/appliance/config.yaml: the stack's settings for this machine (docs/configuration.md
    describes every field)."""
    o, p, layout = plan.options, plan.profile, plan.layout
    cluster: dict = {"name": o.cluster_name, "auth": "munge" if p.munge else "none"}
    if p.cgroups:
        cluster["cgroups"] = True
    if p.local_cluster:
        cluster.update(mode="local", controller_port=o.controller_port, node_port_base=o.node_port)
    else:
        cluster.update(mode="existing", slurm_conf=layout.slurm_etc / "slurm.conf")
    sections: dict[str, dict] = {"cluster": cluster}
    if p.services:
        sections["gateway"] = {
            "host": o.bind,
            "port": o.gateway_port,
            "tls": True,
            "tls_cert": layout.tls_cert,
            "tls_key": layout.tls_key,
        }
        if p.standby:
            # GPU instances: a conversation stays on the instance whose prefix cache holds it.
            # On an H100, two 8B instances, later turns' p90 time to first token 0.42x of
            # least_loaded's, the p50 0.94x (docs/benchmarks.md, seventh lease). On the CPU
            # demo's one core per instance it queues a conversation's turns: least_loaded there.
            sections["gateway"]["routing"] = "prefix_affinity"
        sections["webapp"] = {"host": o.bind, "port": o.webapp_port, "tls": True}
    security: dict = {"service_user": o.service_user} if o.service_user else {}
    if p.services:
        security["quotas"] = QUOTAS
        # The user data in an encrypted volume, its key wrapped by the key-encryption key the
        # installer makes; the knowledge bases' own volumes are mounted beside it, never inside
        # (fusermount3 cannot reach a mount point inside another account's FUSE mount;
        # docs/security.md).
        security["data_at_rest"] = {"enabled": True}
    if security:
        sections["security"] = security
    if p.serving == "gpu":
        sections["monitoring"] = {"expected_gpus": len(plan.hardware.gpus)}
    serving: dict = {}
    if p.name == "head":
        # A shared cluster runs batch work: serve in its gaps, above each model's pinned minimum.
        serving["preemptible"] = True
    if p.standby:
        # GPU instances start through their node's warm standby, which keeps an instance's
        # engine when its job ends and hands it to the next job of the same model files: 3.9 s
        # from a request to the first token of a stopped 8B model on an H100, against 68.3 s
        # for vLLM's own start (docs/benchmarks.md, seventh lease). Other jobs on its GPUs have
        # it dropped first (Slurm's Prolog, appliance/slurm/prolog.py).
        serving["standby"] = True
        serving["keep_engines"] = "gpu"
    if p.standby_nodes:
        serving["standby_nodes"] = list(p.standby_nodes)
    if serving:
        sections["serving"] = serving
    if p.host_cache_gib:
        # Each GPU node's store service keeps models in host memory for cold starts (sized in
        # installer/profile.py, host_tier_gib). Its default address, https://<node address>:
        # <service_port>, is right for every profile: the local cluster's one node is 127.0.0.1.
        sections["store"] = {"host_cache_gib": p.host_cache_gib}
        if p.local_cluster:
            # The tier's memory is the store service's: the local node offers Slurm the rest, so
            # instances given their --mem cannot overcommit the host with a full tier.
            tier_mb = p.host_cache_gib * 1024
            cluster["memory_mb_per_node"] = offered_memory_mb(plan.hardware.memory_mib, tier_mb)
    lines = [HEADER.format(what=f"profile {p.name}").rstrip()]
    lines.append(f"state_dir: {_yaml_scalar(layout.state)}")
    for section, values in sections.items():
        lines.append(f"{section}:")
        lines += _yaml_mapping(values, "  ")
    return "\n".join(lines) + "\n"


def _yaml_mapping(values: dict, indent: str) -> list[str]:
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_yaml_mapping(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {_yaml_scalar(value)}")
    return lines


def render_command(plan: Plan) -> str:
    """/usr/local/bin/appliance: the venv's command, bound to this installation's config."""
    layout = plan.layout
    return (
        "#!/bin/sh\n"
        + HEADER.format(what="the appliance command")
        + f'exec "{layout.venv}/bin/appliance" --config "{layout.config}" "$@"\n'
    )


def render_units(plan: Plan) -> dict[str, str]:
    """systemd units of the appliance's own services (Debian ships munge's and Slurm's)."""
    if not plan.hardware.systemd:
        return {}
    layout, p = plan.layout, plan.profile
    command = f"{layout.venv}/bin/appliance --config {layout.config}"
    header = HEADER.format(what="systemd unit")
    units = {}
    after = "network-online.target" + (" munge.service" if p.munge else "")
    if p.local_cluster:
        units["appliance-cluster.service"] = (
            f"{header}[Unit]\nDescription=appliance: Slurm controller and nodes on this host\n"
            f"Wants=network-online.target\nAfter={after}\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"ExecStart={command} cluster up\nExecStop={command} cluster down\n"
            # slurmd and slurmctld are this unit's processes; cgroups for jobs need delegation.
            "Delegate=yes\nKillMode=process\nTimeoutStartSec=300\n\n"
            "[Install]\nWantedBy=multi-user.target\n"
        )
        after = "appliance-cluster.service"
    elif p.name == "head":
        after = "slurmctld.service"
    if p.standby_nodes:
        # One of each per GPU node of this host (`systemctl enable appliance-standby@n1`),
        # started after the node's slurmd, as the instance jobs they serve are.
        node_unit = after if p.local_cluster else "slurmd.service"
        units["appliance-standby@.service"] = _node_unit(
            header,
            "warm standby of Slurm node %i (vLLM imported, forks instance servers)",
            node_unit,
            f"{command} standby serve --node %i",
            # The servers it forked belong to instance jobs and end with them: stopping or
            # restarting the standby leaves them running.
            "KillMode=process\n",
        )
        units["appliance-store@.service"] = _node_unit(
            header,
            "store service of Slurm node %i (what it holds, its host-memory tier)",
            node_unit,
            f"{command} store serve --node %i",
            # The host tier locks its models in memory (mlock): the limit outlives the drop to
            # the service account, which could not raise it.
            "LimitMEMLOCK=infinity\n",
        )
    if p.services:
        for name, what in (("gateway", "OpenAI-compatible gateway"), ("webapp", "web app")):
            needs = after if name == "gateway" else "appliance-gateway.service"
            units[f"appliance-{name}.service"] = (
                f"{header}[Unit]\nDescription=appliance: {what}\n"
                f"Wants={needs}\nAfter={needs}\n\n"
                f"[Service]\nExecStart={command} {name}\nRestart=on-failure\nRestartSec=5\n"
                "KillMode=mixed\nTimeoutStopSec=60\n\n"
                "[Install]\nWantedBy=multi-user.target\n"
            )
    return units


def _node_unit(header: str, description: str, after: str, command: str, extra: str) -> str:
    """A templated unit of one Slurm node's service (%i: the node's name)."""
    return (
        f"{header}[Unit]\nDescription=appliance: {description}\nAfter={after}\n\n"
        f"[Service]\nExecStart={command}\nRestart=on-failure\nRestartSec=5\n"
        f"{extra}TimeoutStopSec=60\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


def render_cluster_slurm_conf(plan: Plan) -> str:
    """slurm.conf of a multi-node cluster: the head serves it to every node (configless), and
    nodes register themselves with their detected hardware (dynamic nodes, `slurmd -Z`)."""
    o, p = plan.options, plan.profile
    lines = [
        f"ClusterName={o.cluster_name}",
        f"SlurmctldHost={plan.hardware.hostname}",
        f"SlurmctldPort={o.controller_port}",
        f"SlurmdPort={o.node_port}",
        "SlurmUser=slurm",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "# Nodes fetch this file from slurmctld and join as dynamic nodes (slurmd -Z).",
        "SlurmctldParameters=enable_configless",
        f"MaxNodeCount={MAX_NODE_COUNT}",
        "TreeWidth=65533",
        "StateSaveLocation=/var/lib/slurm/slurmctld",
        "SlurmdSpoolDir=/var/lib/slurm/slurmd",
        "SlurmctldPidFile=/run/slurmctld.pid",
        "SlurmdPidFile=/run/slurmd.pid",
        "SlurmctldLogFile=/var/log/slurm/slurmctld.log",
        "SlurmdLogFile=/var/log/slurm/slurmd.log",
        "JobCompType=jobcomp/filetxt",
        "JobCompLoc=/var/log/slurm/jobcomp.txt",
        "AccountingStorageType=accounting_storage/none",
    ]
    if p.cgroups:
        lines += [
            "ProctrackType=proctrack/cgroup",
            "TaskPlugin=task/cgroup,task/affinity",
            "JobAcctGatherType=jobacct_gather/cgroup",
        ]
    else:
        lines += ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none"]
    lines += [
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        f"DefMemPerCPU={DEF_MEM_PER_CPU_MB}",
        "ReturnToService=2",
        "KillWait=30",
        *preemption_lines(),
        "MpiDefault=none",
        "MailProg=/bin/true",
        f"HealthCheckProgram={plan.layout.command.parent / 'appliance-healthcheck'}",
        "HealthCheckInterval=60",
        "HealthCheckNodeState=ANY",
        *([f"Prolog={plan.layout.command.parent / 'appliance-prolog'}"] if p.standby else []),
        "GresTypes=gpu",
        "# Dynamic nodes belong to every partition that lists ALL.",
        *default_partition_lines(),
    ]
    return HEADER.format(what="multi-node Slurm") + "\n".join(lines) + "\n"


def _devices(count: int) -> str:
    return "/dev/nvidia0" if count == 1 else f"/dev/nvidia[0-{count - 1}]"


def render_cluster_gres_conf(plan: Plan) -> str:
    """gres.conf of a multi-node cluster: each node's GPU device files, by node name
    (Debian's Slurm has no NVML autodetection)."""
    hw = plan.hardware
    lines = ["AutoDetect=off"]
    if hw.gpus:
        lines.append(
            f"NodeName={hw.hostname} Name=gpu Type={hw.gpus[0].kind} File={_devices(len(hw.gpus))}"
        )
    lines += [
        f"NodeName={w.name} Name=gpu File={_devices(w.gpus)}"
        for w in plan.options.workers
        if w.gpus
    ]
    return HEADER.format(what="multi-node Slurm GPUs") + "\n".join(lines) + "\n"


def render_slurmd_defaults(plan: Plan) -> str:
    """/etc/default/slurmd: Debian's slurmd unit fetches the configuration from the head and
    registers this node with its GPUs. systemd splits the value on spaces without honouring
    quotes, so each option is one word."""
    o, hw = plan.options, plan.hardware
    head = o.head if plan.profile.name == "worker" else hw.hostname
    options = [f"--conf-server={head}:{o.controller_port}", "-Z"]
    if hw.gpus:
        options.append(f"--conf=Gres=gpu:{len(hw.gpus)}")
    return HEADER.format(what="slurmd options") + f'SLURMD_OPTIONS="{" ".join(options)}"\n'


def render_health_check(plan: Plan) -> str:
    """The node health check slurmd runs (drains a failing node)."""
    return (
        "#!/bin/sh\n"
        + HEADER.format(what="Slurm HealthCheckProgram")
        + f'exec "{plan.layout.command}" health-check --apply\n'
    )


def render_prolog(plan: Plan) -> str:
    """Slurm's Prolog on every node of a multi-node cluster: a job with GPUs gets them without
    the node's idle kept engines on them (serving.keep_engines)."""
    drop = (
        f'"{plan.layout.command}" standby drop --node "$SLURMD_NODENAME" --gpus "$SLURM_JOB_GPUS"'
    )
    return render_prolog_script(drop)


def written_files(plan: Plan) -> list[tuple[Path, str, str | None]]:
    """(path, what it is, its text) of every file the installer writes; text None for files
    made while installing (keys, certificates, the local cluster's Slurm configuration)."""
    layout, p = plan.layout, plan.profile
    files: list[tuple[Path, str, str | None]] = [
        (layout.config, "appliance configuration", render_config(plan)),
        (layout.command, "the `appliance` command of this installation", render_command(plan)),
    ]
    if p.local_cluster:
        slurm = StateLayout(layout.state).slurm
        files += [
            (slurm.slurm_conf, "Slurm, from the detected hardware", None),
            (slurm.gres_conf, "Slurm GPUs", None),
        ]
        if p.cgroups:
            files.append((slurm.cgroup_conf, "Slurm job confinement", None))
        if p.standby:
            files.append((slurm.prolog, "Slurm's job prolog", None))
    else:
        if p.name == "head":
            files += [
                (
                    layout.slurm_etc / "slurm.conf",
                    "Slurm, served to every node",
                    render_cluster_slurm_conf(plan),
                ),
                (
                    layout.slurm_etc / "gres.conf",
                    "Slurm GPUs per node",
                    render_cluster_gres_conf(plan),
                ),
            ]
            if p.cgroups:
                cgroup = HEADER.format(what="Slurm cgroups") + CGROUP_CONF_BODY
                files.append((layout.slurm_etc / "cgroup.conf", "Slurm job confinement", cgroup))
        files.append(
            (
                layout.command.parent / "appliance-healthcheck",
                "node health check",
                render_health_check(plan),
            )
        )
        # On every node, whether or not it has GPUs: the head's slurm.conf names it for all.
        files.append(
            (layout.command.parent / "appliance-prolog", "Slurm's job prolog", render_prolog(plan))
        )
        if p.name == "worker" or plan.hardware.gpus:
            files.append(
                (layout.slurmd_defaults, "slurmd joins the cluster", render_slurmd_defaults(plan))
            )
        if p.name == "worker":
            files.append((layout.munge_key, "the head's munge key", None))
    if p.services:
        files.append((layout.tls_cert, "TLS certificate (self-signed; key beside it, 0600)", None))
    for name, text in render_units(plan).items():
        files.append((layout.systemd_dir / name, "systemd unit", text))
    return files
