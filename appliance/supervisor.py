"""`appliance supervise`: keeps an installed appliance's services up where systemd does not run
(containers): munged, the local Slurm cluster, the nodes' warm standbys, the gateway and the web
app, restarted with backoff when they die, all stopped together on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import ApplianceSettings
from appliance.security.data_volume import DataSealed, close_volume, openable
from appliance.slurm.local_cluster import LocalCluster

# Restart delays grow from the first to the last, and reset after a child ran this long.
BACKOFF_S = (1, 2, 5, 10, 30, 60)
STABLE_S = 120
STOP_TIMEOUT_S = 30
# How often the Slurm daemons are checked (and the cluster brought up again if one died).
CLUSTER_CHECK_S = 30


def log(message: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S ") + message, flush=True)


@dataclass
class Child:
    """One supervised process and its restart history."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0
    next_start: float = 0.0
    log_file: Path | None = field(default=None, repr=False)

    def start(self) -> None:
        assert self.log_file is not None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        log(f"{self.name} started (pid {self.proc.pid})")

    def check(self, now: float) -> None:
        """Restart the child if it exited, after its backoff delay."""
        if self.proc is not None and self.proc.poll() is None:
            if now - self.started > STABLE_S:
                self.failures = 0
            return
        if self.proc is not None:
            code = self.proc.returncode
            self.proc = None
            delay = BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
            self.failures += 1
            self.next_start = now + delay
            log(f"{self.name} exited with {code}; restarting in {delay} s (see {self.log_file})")
        if now >= self.next_start:
            self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log(f"{self.name} stopped")


class Supervisor:
    """Runs until SIGTERM or SIGINT."""

    def __init__(self, settings: ApplianceSettings, config_file: Path):
        self.settings = settings
        base = [sys.executable, "-m", "appliance.cli.main", "--config", str(config_file)]
        standby_nodes = settings.serving.standby_nodes if settings.serving.standby else []
        # Each GPU node's store service runs whether or not its standby does (ServiceManager).
        self.children = [
            Child(
                f"store-{node}",
                [*base, "store", "serve", "--node", node],
                log_file=settings.log_dir / f"store-{node}.log",
            )
            for node in settings.serving.standby_nodes
        ]
        self.children += [
            Child(
                f"standby-{node}",
                [*base, "standby", "serve", "--node", node],
                log_file=settings.log_dir / f"standby-{node}.log",
            )
            for node in standby_nodes
        ]
        self.children.append(
            Child("gateway", [*base, "gateway"], log_file=settings.log_dir / "gateway.log")
        )
        if settings.webapp.enabled:
            self.children.append(
                Child("webapp", [*base, "webapp"], log_file=settings.log_dir / "webapp.log")
            )
        self.stopping = False

    def _stop_signal(self, signum, _frame) -> None:
        log(f"signal {signum}: stopping")
        self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop_signal)
        signal.signal(signal.SIGINT, self._stop_signal)
        if self.settings.security.data_at_rest.enabled:
            openable(self.settings)  # refused: the supervisor exits saying why
        if self.settings.cluster.auth == "munge":
            ensure_munged()
        cluster = None
        if self.settings.cluster.mode == "local":
            cluster = LocalCluster(self.settings)
            cluster.up()
            log("local Slurm cluster up")
        last_check = time.monotonic()
        try:
            while not self.stopping:
                now = time.monotonic()
                for child in self.children:
                    child.check(now)
                if cluster is not None and now - last_check > CLUSTER_CHECK_S:
                    last_check = now
                    if not cluster.status().running:
                        log("Slurm daemons not all running: bringing the cluster up again")
                        cluster.up()
                time.sleep(0.5)
        finally:
            for child in reversed(self.children):
                child.stop()
            if cluster is not None:
                cluster.down()
                log("local Slurm cluster stopped")
            # Last: the cluster's jobs read from it until they stop.
            if self.settings.security.data_at_rest.enabled:
                try:
                    if close_volume(self.settings):
                        log("data volume closed: the user data is sealed")
                except DataSealed as exc:
                    log(f"data volume left open: {exc}")


def ensure_munged() -> None:
    """Start munged (as the munge account, as Debian's unit does) unless it answers."""
    ok = subprocess.run(["munge", "-n"], capture_output=True, check=False).returncode == 0
    if ok:
        return
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    log("munged started")
