"""A throwaway stack (local Slurm cluster + gateway subprocess) on free ports, for tests and
benchmarks. Everything it starts is stopped on exit, also when the caller fails."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from appliance.security import node_tls

from appliance import envs
from appliance.cli.breaker import authorized_key_line
from appliance.config import ApplianceSettings
from appliance.config.cluster import ClusterSettings
from appliance.daemon import tail
from appliance.serving.job_script import job_name_prefix
from appliance.slurm.client import SlurmClient
from appliance.slurm.daemons import find_daemons, stop_processes
from appliance.slurm.local_cluster import LocalCluster
from appliance.slurm.runner import LocalRunner, SlurmCommandError
from appliance.state_version import SCHEMA_VERSION, read_record, write_record


def tiny_model_cache_dir() -> Path:
    """Where tests and benchmarks keep the tiny model they build once and reuse."""
    repo = Path(__file__).resolve().parent.parent
    return Path(envs.APPLIANCE_TEST_CACHE or repo / ".state" / "test-cache") / "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ports are drawn from here; it avoids the defaults (16817, 17001...) and the ephemeral range.
_PORT_RANGE = (20000, 32000)


def _port_free(port: int) -> bool:
    # slurmctld and slurmd listen on all addresses; test both the wildcard and loopback.
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port_block(count: int, attempts: int = 200) -> int:
    """The first of `count` consecutive TCP ports that are free right now."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found in {_PORT_RANGE}")


def unique_cluster_name() -> str:
    """A ClusterName no other run uses (job names start with it too)."""
    return f"t{os.getpid()}x{random.randrange(16**4):04x}"


def local_cluster_settings(
    state_dir: Path,
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    shards_per_gpu: int = 4,
    cluster: dict[str, Any] | None = None,
    **sections: Any,
) -> ApplianceSettings:
    """Settings for a private cluster under `state_dir` on free ports, with a unique name;
    `sections` (gateway=..., catalog=...) fill the other settings sections."""
    base = free_port_block(nodes + 1)
    values: dict[str, Any] = {
        "mode": "local",
        "name": unique_cluster_name(),
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "shards_per_gpu": shards_per_gpu,
        "controller_port": base,
        "node_port_base": base + 1,
        "kill_wait_s": 1,  # tests cancel jobs; no need to wait long for them to exit
        "ready_timeout_s": 60.0,
    }
    values.update(cluster or {})
    # Built directly, not with load_settings: a host's /etc/appliance/config.yaml must not leak in.
    return ApplianceSettings(state_dir=state_dir, cluster=ClusterSettings(**values), **sections)


def start_local_cluster(settings: ApplianceSettings) -> LocalCluster:
    """Start the local cluster `settings` describe; if start-up fails, nothing is left running."""
    cluster = LocalCluster(settings)
    try:
        cluster.up()
    except BaseException:
        stop_local_cluster(cluster)
        raise
    return cluster


def stop_local_cluster(cluster: LocalCluster) -> None:
    """Cancel every job, run down(), then SIGKILL any daemon of this cluster that is left."""
    client = SlurmClient(LocalRunner(), cluster.paths.slurm_conf, timeout=10)
    with contextlib.suppress(SlurmCommandError):
        # Tests own the whole cluster: cancel all jobs, not only those with the stack's prefix.
        if cluster.paths.slurm_conf.exists() and client.ping():
            for job in client.jobs():
                if job.active:
                    client.cancel(job.job_id)
    try:
        cluster.down()
    finally:
        left = find_daemons(cluster.paths.slurm_conf)
        if left:
            stop_processes([d.pid for d in left.values()], timeout=2.0)


@contextlib.contextmanager
def running_local_cluster(settings: ApplianceSettings) -> Iterator[LocalCluster]:
    """A started local cluster that is stopped on exit, whether the body passed or failed."""
    cluster = start_local_cluster(settings)
    try:
        yield cluster
    finally:
        stop_local_cluster(cluster)


def write_config(settings: ApplianceSettings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path


def run_cli(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`appliance --config CONFIG ARGS...` in a subprocess, its output captured."""
    argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _loopback_url(port: int, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://127.0.0.1:{port}"


@contextlib.contextmanager
def _running_service(
    settings: ApplianceSettings,
    command: str,
    url: str,
    timeout: float,
    args: tuple[str, ...] = (),
    name: str | None = None,
    verify: ssl.SSLContext | bool | None = None,
) -> Iterator[str]:
    """Run `appliance <command> [args]` on loopback as a subprocess and wait for its /health;
    yields its base URL; stops it on exit (SIGTERM, then SIGKILL)."""
    name = name or command
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # The tests' state was made by this code (keys, users before the first start): it has this
    # release's schema, which the services require (appliance.state_version).
    if read_record(settings.state_dir) is None:
        write_record(settings.state_dir, SCHEMA_VERSION)
    config = write_config(settings, settings.state_dir / f"{name}-config.yaml")
    log_path = settings.state_dir / f"{name}-test.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), command, *args]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{command} exited with {proc.returncode}:\n{tail(log_path, 40)}"
                )
            try:
                trust = settings.tls_verify if verify is None else verify
                health = httpx.get(url + "/health", timeout=1, verify=trust)
                if health.status_code == 200:
                    break
            except (httpx.HTTPError, FileNotFoundError):  # not up, or no certificate made yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{command} not healthy after {timeout} s:\n{tail(log_path, 40)}"
                )
            time.sleep(0.2)
        yield url
    finally:
        _terminate(proc)


@contextlib.contextmanager
def running_gateway(
    settings: ApplianceSettings, timeout: float = 60.0, keep_instances: bool = False
) -> Iterator[str]:
    """Run `appliance gateway` as a subprocess; yields its base URL; on exit stops the gateway,
    then cancels every instance job it started and waits for them to end, unless
    `keep_instances`: then they run on, as over a restart of the gateway's service, for the next
    gateway to adopt (the local cluster's stop still cancels them)."""
    try:
        url = _loopback_url(settings.gateway.port, settings.gateway.tls)
        with _running_service(settings, "gateway", url, timeout) as url:
            yield url
    finally:
        # Through the breaker, the cluster side cleans up.
        if not settings.breaker.enabled and not keep_instances:
            cancel_instances(settings)


@contextlib.contextmanager
def running_webapp(settings: ApplianceSettings, timeout: float = 90.0) -> Iterator[str]:
    """Run `appliance webapp` as a subprocess (it reaches the gateway `settings` describe);
    yields its base URL and stops it on exit."""
    url = _loopback_url(settings.webapp.port, settings.webapp.tls)
    with _running_service(settings, "webapp", url, timeout) as url:
        yield url


@contextlib.contextmanager
def running_store_service(settings: ApplianceSettings, node: str, url: str) -> Iterator[str]:
    """Run `appliance store serve` for `node` on the loopback port of `url` (the node's entry in
    store.services); yields the URL and stops the service on exit."""
    port = url.rsplit(":", 1)[1]
    args = ("serve", "--node", node, "--port", port)
    node_tls.ensure_internal_ca(settings)  # as the service would, so its CA can be trusted here
    verify = node_tls.verify(settings)  # its node's certificate, from the internal CA
    with _running_service(settings, "store", url, 120, args, f"store-{node}", verify) as url:
        yield url


@contextlib.contextmanager
def running_standby(settings: ApplianceSettings, node: str, timeout: float = 120) -> Iterator[Path]:
    """Run `appliance standby serve` for `node`; yields its socket once it answers; stops it."""
    path = settings.standby_socket(node)
    config = write_config(settings, settings.state_dir / f"standby-{node}-config.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    argv = [
        sys.executable,
        "-m",
        "appliance.cli.main",
        "--config",
        str(config),
        "standby",
        "serve",
        "--node",
        node,
    ]
    log_path = settings.state_dir / f"standby-{node}.log"
    with log_path.open("ab") as log:
        start = log.tell()  # an earlier standby's "ready" in the same log does not count
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while b"ready on" not in log_path.read_bytes()[start:]:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"standby did not start:\n{tail(log_path, 40)}")
            time.sleep(0.2)
        yield path
    finally:
        _terminate(proc)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def cancel_instances(settings: ApplianceSettings, timeout: float = 30.0) -> None:
    """Cancel every instance job of this stack and wait (bounded) until Slurm has ended them."""
    client = SlurmClient(LocalRunner(), settings.slurm_conf)
    prefix = job_name_prefix(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in client.jobs(prefix) if j.active]
        if not jobs:
            return
        for job in jobs:
            client.cancel(job.job_id)
        time.sleep(0.5)


@dataclass(frozen=True)
class BreakerSshd:
    """A running sshd on loopback whose client key can only run the breaker."""

    port: int
    directory: Path

    @property
    def client_key(self) -> Path:
        return self.directory / "client"

    def known_hosts(self, path: Path) -> Path:
        """Write the host's key as ssh-keyscan would; returns `path`."""
        path.write_text(f"[127.0.0.1]:{self.port} {(self.directory / 'host.pub').read_text()}")
        return path

    def breaker_section(self, known_hosts: Path, **extra: object) -> dict:
        """The `breaker` settings of a gateway that reaches the cluster through this sshd."""
        return {
            "enabled": True,
            "host": "127.0.0.1",
            "port": self.port,
            "user": pwd.getpwuid(os.getuid()).pw_name,
            "identity_file": str(self.client_key),
            "known_hosts_file": str(self.known_hosts(known_hosts)),
            **extra,
        }


@contextlib.contextmanager
def running_breaker_sshd(
    cluster_settings: ApplianceSettings, directory: Path
) -> Iterator[BreakerSshd]:
    """sshd on a free loopback port with a generated host key and a client key pinned to
    `appliance breaker serve` for `cluster_settings` (the cluster side); stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(cluster_settings, directory / "breaker-config.yaml")
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True
        )

    pub = (directory / "client.pub").read_text()
    (directory / "authorized_keys").write_text(
        authorized_key_line(sys.executable, config, pub) + "\n"
    )
    port = free_port()
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host'}\n"
        f"PidFile {directory / 'sshd.pid'}\nAuthorizedKeysFile {directory / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPrintMotd no\n"
        "AllowTcpForwarding no\nX11Forwarding no\nPermitTTY no\nPermitUserEnvironment no\n"
        "MaxSessions 64\nLogLevel ERROR\n"
        # The forced command runs the code under test (a worktree's, by PYTHONPATH), not the
        # one the interpreter has installed: sshd gives it a clean environment.
        + (
            f"SetEnv PYTHONPATH={os.environ['PYTHONPATH']}\n"
            if os.environ.get("PYTHONPATH")
            else ""
        )
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    with (directory / "sshd.log").open("wb") as log:
        sshd = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(directory / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            if time.monotonic() > deadline or sshd.poll() is not None:
                raise RuntimeError((directory / "sshd.log").read_text())
            time.sleep(0.1)
        yield BreakerSshd(port, directory)
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class InstanceEngine:
    """The engine processes of a model instance on this machine (not its API server), which
    tests and benchmarks `stall` (SIGSTOP) mid-answer and let `go_on`: the tiny model answers
    in under a second, so without a stall an answer is over before a move or a replacement
    can happen. The engine's busy-polling processes get one CPU and the API server the others,
    so an answer streams as it is made (on two cores they would starve the API server, which
    then sends the whole answer at the end)."""

    def __init__(self, instance_url: str):
        port = int(instance_url.rsplit(":", 1)[1])
        listening = [
            c.pid
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        if not listening:
            raise RuntimeError(f"no process listens at {instance_url}")
        server = psutil.Process(listening[0])
        self.processes = server.children(recursive=True)
        if not self.processes:
            raise RuntimeError(f"the instance at {instance_url} has no engine processes")
        cpus = server.cpu_affinity()
        if len(cpus) > 1:
            server.cpu_affinity(cpus[1:])
            for process in self.processes:
                process.cpu_affinity(cpus[:1])

    def _signal(self, action: str) -> None:
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):  # its job was cancelled
                getattr(process, action)()

    def stall(self) -> None:
        self._signal("suspend")

    def go_on(self) -> None:
        self._signal("resume")
