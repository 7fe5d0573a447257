"""The local Slurm cluster: one slurmctld and N slurmd on this host, run by the CLI."""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.atomic_files import write_if_changed
from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.layout import MAX_SOCKET_PATH, LocalClusterPaths
from appliance.names import local_node_names
from appliance.slurm.client import SlurmClient, SlurmNode
from appliance.slurm.conf import (
    ClusterLayout,
    HealthCheck,
    detect_host_facts,
    plan_cluster,
    render_cgroup_conf,
    render_gres_conf,
    render_health_check_script,
    render_slurm_conf,
)
from appliance.slurm.daemons import (
    DaemonProcess,
    find_daemons,
    is_alive,
    output_tail,
    start_daemon,
    stop_processes,
)
from appliance.slurm.install import ensure_slurm_installed, find_program, slurmstepd_beside
from appliance.slurm.prolog import render_prolog_script
from appliance.slurm.runner import CommandRunner, LocalRunner, SlurmCommandError

# How often readiness is polled; nodes register about a second after slurmd starts.
POLL_INTERVAL_S = 0.25
# Seconds between SIGTERM and SIGKILL when the daemons are stopped.
STOP_TIMEOUT_S = 10.0
# Node states in which a node takes jobs (it may already run some).
_READY_BASE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})
_UNREADY_FLAGS = frozenset({"drain", "not_responding", "fail", "maint", "reboot_requested"})
# /dev/null's device numbers: a harmless character device that Slurm accepts as a GPU file.
_FAKE_GPU_DEVICE = os.makedev(1, 3)


@dataclass
class DaemonStatus:
    """One daemon of the local cluster and whether it runs."""

    name: str
    pid: int | None
    port: int
    log: Path

    @property
    def running(self) -> bool:
        return self.pid is not None


@dataclass
class ClusterStatus:
    """What `appliance cluster status` shows: daemons, controller reachability, nodes."""

    name: str
    mode: str
    slurm_conf: Path | None
    daemons: list[DaemonStatus] = field(default_factory=list)
    controller_reachable: bool = False
    nodes: list[SlurmNode] = field(default_factory=list)
    problem: str | None = None
    """Why nodes could not be listed, if they could not."""

    @property
    def running(self) -> bool:
        """Every daemon runs, the controller answers and every node takes jobs."""
        daemons_ok = all(d.running for d in self.daemons)
        return daemons_ok and self.controller_reachable and all(node_ready(n) for n in self.nodes)

    def render(self) -> str:
        """A human-readable report for the CLI."""
        lines = [f"cluster {self.name} ({self.mode})  config: {self.slurm_conf or 'Slurm default'}"]
        if self.daemons:
            lines.append("")
            rows = [("DAEMON", "STATE", "PID", "PORT", "LOG")]
            for d in self.daemons:
                state = "running" if d.running else "stopped"
                rows.append((d.name, state, str(d.pid or "-"), str(d.port), str(d.log)))
            lines.extend(_table(rows))
        lines.append("")
        lines.append(f"controller: {'reachable' if self.controller_reachable else 'not reachable'}")
        if self.nodes:
            lines.append("")
            rows = [("NODE", "STATE", "CPUS(A/T)", "MEMORY_MB(A/T)", "GRES", "GRES_USED", "REASON")]
            for n in self.nodes:
                rows.append(
                    (
                        n.name,
                        n.state,
                        f"{n.alloc_cpus}/{n.cpus}",
                        f"{n.alloc_memory_mb}/{n.real_memory_mb}",
                        n.gres or "-",
                        n.gres_used or "-",
                        n.reason or "",
                    )
                )
            lines.extend(_table(rows))
        if self.problem:
            lines.append("")
            lines.append(f"problem: {self.problem}")
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def node_ready(node: SlurmNode) -> bool:
    """Whether the node takes jobs: registered, not drained, not down."""
    return node.base_state in _READY_BASE_STATES and not set(node.flags) & _UNREADY_FLAGS


class LocalCluster:
    """Writes the local cluster's configuration and runs its daemons; state survives restarts."""

    def __init__(self, settings: ApplianceSettings, runner: CommandRunner | None = None):
        self.settings = settings
        self.cluster = settings.cluster
        # Absolute: the daemons do not run in our working directory, and find_daemons() matches
        # the -f path literally.
        self.paths = LocalClusterPaths(settings.slurm_dir.absolute())
        self.runner: CommandRunner = runner or LocalRunner()
        conf = self.paths.slurm_conf if self.cluster.mode == "local" else settings.slurm_conf
        self.client = SlurmClient(self.runner, conf)
        # Pids of this cluster's daemons as of the latest up(), keyed like find_daemons().
        self._pids: dict[str, int] = {}

    # -- public ---------------------------------------------------------------------------------

    def up(self) -> ClusterStatus:
        """Start (or keep) the daemons and wait until every node is idle; safe to run again."""
        self._require_local("up")
        self._check_path_lengths()
        with self._exclusive():
            return self._up()

    def _up(self) -> ClusterStatus:
        ensure_slurm_installed(self.runner)
        facts = detect_host_facts(self.runner, user=pwd.getpwuid(os.geteuid()).pw_name)
        layout = plan_cluster(self.cluster, self.paths.root, facts)
        health = HealthCheck(self.paths.health_check, self.settings.monitoring.health_interval_s)
        prolog = self.paths.prolog if self.settings.serving.keeps_engines else None
        slurm_conf = render_slurm_conf(self.cluster, self.paths.root, facts, health, prolog)
        gres_conf = render_gres_conf(self.cluster, self.paths.root, facts)

        self._make_dirs(layout)
        running = find_daemons(self.paths.slurm_conf)
        if running and self._config_differs(slurm_conf, gres_conf):
            # Slurm reads its config at start; a changed node list needs a full restart.
            self._stop(list(running.values()))
            running = {}
        # Slurm's tools read these as whoever runs them (the service account, batch users):
        # readable by all whatever the umask (the state directory around them is private).
        os.chmod(self.paths.root, 0o755)
        write_if_changed(self.paths.slurm_conf, slurm_conf, 0o644)
        write_if_changed(self.paths.gres_conf, gres_conf, 0o644)
        write_if_changed(self.paths.cgroup_conf, render_cgroup_conf(self.cluster.cgroups))
        self._write_health_check()
        if prolog is not None:
            # The settings the health check reads are this cluster's too.
            drop = (
                f'"{sys.executable}" -m appliance.cli.main --config "{self.paths.health_config}" '
                'standby drop --node "$SLURMD_NODENAME" --gpus "$SLURM_JOB_GPUS"'
            )
            write_if_changed(prolog, render_prolog_script(drop), 0o755)
        stale = [d for k, d in running.items() if k.startswith("slurmd:") and not _in(k, layout)]
        self._stop(stale)
        self._pids = {k: d.pid for k, d in running.items() if d not in stale}

        deadline = time.monotonic() + self.cluster.ready_timeout_s
        if "slurmctld" not in running:
            self._start("slurmctld", None)
        self._wait_for_controller(deadline)
        for node in layout.nodes:
            if f"slurmd:{node.name}" not in running:
                self._start("slurmd", node.name)
        self._wait_for_nodes(layout, deadline)
        return self.status()

    def down(self) -> None:
        """Cancel the stack's jobs, then stop every daemon of this cluster; state is kept."""
        self._require_local("down")
        with self._exclusive():
            self._down()

    def _down(self) -> None:
        running = find_daemons(self.paths.slurm_conf)
        if not running:
            return
        if "slurmctld" in running:
            self._cancel_stack_jobs()
        # slurmd first, so the controller does not mark nodes down while we are stopping.
        slurmds = [d for d in running.values() if d.kind == "slurmd"]
        self._stop(slurmds)
        self._stop([d for d in running.values() if d.kind == "slurmctld"])

    def status(self) -> ClusterStatus:
        """Daemons (local mode), whether the controller answers, and the node table."""
        status = ClusterStatus(
            name=self.cluster.name, mode=self.cluster.mode, slurm_conf=self.client.slurm_conf
        )
        if self.cluster.mode == "local":
            status.daemons = self._daemon_statuses()
            if not self.paths.slurm_conf.exists():
                status.problem = "not set up yet: run `appliance cluster up`"
                return status
            if not any(d.running and d.name == "slurmctld" for d in status.daemons):
                status.problem = "slurmctld is not running: run `appliance cluster up`"
                return status
        try:
            status.controller_reachable = self.client.ping()
            if status.controller_reachable:
                status.nodes = self.client.nodes()
        except SlurmCommandError as exc:
            status.problem = str(exc)
        return status

    # -- start and stop -------------------------------------------------------------------------

    def _require_local(self, action: str) -> None:
        if self.cluster.mode != "local":
            raise ApplianceError(
                f"`appliance cluster {action}` manages the local cluster only, but cluster.mode is "
                f"'{self.cluster.mode}' (the site runs its Slurm daemons); set cluster.mode: local "
                "to let the stack run its own"
            )

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One up()/down() at a time per cluster (e.g. `appliance up` racing `cluster up`)."""
        self.paths.run.mkdir(parents=True, exist_ok=True)
        timeout = self.cluster.ready_timeout_s + STOP_TIMEOUT_S + 60
        deadline = time.monotonic() + timeout
        with (self.paths.run / "appliance.lock").open("w") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ApplianceError(
                            f"another `appliance cluster up/down` has held {lock.name} for "
                            f"{timeout:g} s; is one stuck?"
                        ) from None
                    time.sleep(POLL_INTERVAL_S)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_path_lengths(self) -> None:
        longest = local_node_names(self.cluster.nodes)[-1]
        if self.paths.step_socket_length(longest) > MAX_SOCKET_PATH:
            raise ApplianceError(
                f"state_dir {self.settings.state_dir} is too long for Slurm: job-step sockets "
                f"under {self.paths.node_spool(longest)} would exceed the "
                f"{MAX_SOCKET_PATH}-character limit of Unix socket paths; choose a shorter one"
            )

    def _write_health_check(self) -> None:
        """The health check and the settings it reads (it runs under slurmd, not under us)."""
        import yaml

        settings = self.settings.model_dump(mode="json")
        write_if_changed(self.paths.health_config, yaml.safe_dump(settings, sort_keys=False))
        script = render_health_check_script(sys.executable, self.paths.health_config)
        write_if_changed(self.paths.health_check, script, 0o755)

    def _make_dirs(self, layout: ClusterLayout) -> None:
        for directory in (self.paths.state, self.paths.log, self.paths.run):
            directory.mkdir(parents=True, exist_ok=True)
        for node in layout.nodes:
            spool = self.paths.node_spool(node.name)
            spool.mkdir(parents=True, exist_ok=True)
            # Jobs run as their users and exec their script from the spool: passable by all
            # whatever the umask, as Slurm's own /var/spool/slurmd is.
            for directory in (spool.parent, spool):
                os.chmod(directory, 0o755)
        if layout.simulated_gpus:
            for node in layout.nodes:
                for gpu in node.gpu_files:
                    _make_char_device(Path(gpu))

    def _config_differs(self, slurm_conf: str, gres_conf: str) -> bool:
        return (
            _read(self.paths.slurm_conf) != slurm_conf or _read(self.paths.gres_conf) != gres_conf
        )

    def _daemon_argv(self, kind: str, node: str | None) -> list[str]:
        program = find_program(kind) or kind
        conf = str(self.paths.slurm_conf)
        if kind == "slurmctld":
            # -D: foreground (we own the process); -i: start even if saved state has problems.
            return [program, "-D", "-i", "-f", conf]
        # The slurmstepd of the same installation, also when it is not where Slurm was built for.
        stepd = slurmstepd_beside(program) if os.path.isabs(program) else None
        return [program, "-D", "-N", str(node), *(["-d", stepd] if stepd else []), "-f", conf]

    def _output(self, kind: str, node: str | None) -> Path:
        return self.paths.daemon_output(kind if node is None else f"{kind}-{node}")

    def _start(self, kind: str, node: str | None) -> None:
        pid = start_daemon(self._daemon_argv(kind, node), self._output(kind, node))
        self._pids[kind if node is None else f"{kind}:{node}"] = pid

    def _stop(self, daemons: list[DaemonProcess]) -> None:
        if daemons:
            stop_processes([d.pid for d in daemons], timeout=STOP_TIMEOUT_S)

    def _check_alive(self, kind: str, node: str | None) -> None:
        # By pid, not by command line: right after the fork /proc still shows Python's argv.
        pid = self._pids.get(kind if node is None else f"{kind}:{node}")
        if pid is None or not is_alive(pid):
            name = kind if node is None else f"{kind} for node {node}"
            output = self._output(kind, node)
            tail = output_tail(output)
            # Slurm states the cause in its last "fatal:" line; put it first, then the context.
            fatal = [
                line.split("fatal:", 1)[1].strip() for line in tail.splitlines() if "fatal:" in line
            ]
            cause = f": {fatal[-1]}" if fatal else ""
            raise ApplianceError(
                f"{name} stopped right after it started{cause}\nLast lines of {output}:\n"
                + _indent(tail)
            )

    # -- waiting --------------------------------------------------------------------------------

    def _wait_for_controller(self, deadline: float) -> None:
        while True:
            self._check_alive("slurmctld", None)
            if self.client.ping():
                return
            if time.monotonic() >= deadline:
                output = self._output("slurmctld", None)
                raise ApplianceError(
                    f"slurmctld runs but does not answer on port {self.cluster.controller_port} "
                    f"after {self.cluster.ready_timeout_s:g} s. Last lines of {output}:\n"
                    + _indent(output_tail(output))
                )
            time.sleep(POLL_INTERVAL_S)

    def _wait_for_nodes(self, layout: ClusterLayout, deadline: float) -> None:
        wanted = [n.name for n in layout.nodes]
        resumed: set[str] = set()
        nodes: dict[str, SlurmNode] = {}
        while True:
            self._check_alive("slurmctld", None)
            for name in wanted:
                self._check_alive("slurmd", name)
            nodes = {n.name: n for n in self.client.nodes()}
            for name in wanted:
                node = nodes.get(name)
                # A drain saved by an earlier run (or a health check) survives restarts in the
                # state directory; a fresh `up` means the operator wants the nodes back. Slurm
                # refuses to resume a node that has not registered yet (state "unknown").
                if (
                    node is not None
                    and node.drained
                    and node.base_state != "unknown"
                    and name not in resumed
                ):
                    self.client.update_node(name, "resume")
                    resumed.add(name)
            if all(name in nodes and node_ready(nodes[name]) for name in wanted):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        details = []
        for name in wanted:
            node = nodes.get(name)
            if node is None:
                details.append(f"{name}: unknown to slurmctld")
            elif not node_ready(node):
                output = self._output("slurmd", name)
                details.append(
                    f"{name}: {node.state}"
                    + (f" ({node.reason})" if node.reason else "")
                    + f"; last lines of {output}:\n"
                    + _indent(output_tail(output, lines=8))
                )
        raise ApplianceError(
            f"nodes not ready after {self.cluster.ready_timeout_s:g} s "
            "(cluster.ready_timeout_s):\n" + "\n".join(details)
        )

    # -- jobs and status ------------------------------------------------------------------------

    def _cancel_stack_jobs(self) -> None:
        """Cancel active jobs named with the cluster's prefix and wait (bounded) until they end."""
        try:
            if not self.client.ping():
                return
            jobs = [j for j in self.client.jobs(self.cluster.name) if j.active]
            for job in jobs:
                self.client.cancel(job.job_id)
            # Give jobs KillWait plus a margin to end, so no job step outlives its slurmd.
            deadline = time.monotonic() + self.cluster.kill_wait_s + 10.0
            ids = {j.job_id for j in jobs}
            while ids and time.monotonic() < deadline:
                ids &= {j.job_id for j in self.client.jobs(self.cluster.name) if j.active}
                if ids:
                    time.sleep(POLL_INTERVAL_S)
        except SlurmCommandError:
            pass  # a controller that does not answer cannot cancel; stopping goes on regardless

    def _daemon_statuses(self) -> list[DaemonStatus]:
        running = find_daemons(self.paths.slurm_conf)
        names = local_node_names(self.cluster.nodes)
        # Also show slurmd of nodes that are no longer configured but still run.
        extra = sorted(k.split(":", 1)[1] for k in running if k.startswith("slurmd:"))
        names += [n for n in extra if n not in names]
        statuses = [
            DaemonStatus(
                "slurmctld",
                _pid(running.get("slurmctld")),
                self.cluster.controller_port,
                self.paths.log / "slurmctld.log",
            )
        ]
        for name in names:
            index = int(name[1:]) if name[1:].isdigit() else 0
            statuses.append(
                DaemonStatus(
                    f"slurmd {name}",
                    _pid(running.get(f"slurmd:{name}")),
                    self.cluster.node_port_base + index - 1,
                    self.paths.log / f"slurmd-{name}.log",
                )
            )
        return statuses


def _pid(daemon: DaemonProcess | None) -> int | None:
    return daemon.pid if daemon is not None and is_alive(daemon.pid) else None


def _in(key: str, layout: ClusterLayout) -> bool:
    return key.split(":", 1)[1] in {n.name for n in layout.nodes}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _make_char_device(path: Path) -> None:
    """A character device standing in for a GPU (Slurm rejects plain files as GRES files)."""
    try:
        st = path.lstat()
        if stat.S_ISCHR(st.st_mode):
            return
        path.unlink()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, _FAKE_GPU_DEVICE)
    except PermissionError:
        raise ApplianceError(
            f"cannot create the simulated GPU device {path}: mknod needs root. Run "
            "`appliance cluster up` as root, or set cluster.gpus_per_node: 0 for a CPU-only cluster"
        ) from None


def _indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")
