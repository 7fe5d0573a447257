"""A throwaway stack (local Slurm cluster + gateway subprocess) on free ports, for tests and
benchmarks. Everything it starts is stopped on exit, also when the caller fails."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from appliance.config import ApplianceSettings, load_settings
from appliance.daemon import tail
from appliance.serving.sbatch import job_name_prefix
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int) -> int:
    """First of `count` consecutive free ports (slurmd ports must be consecutive)."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65000:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports found")


def cluster_settings(
    state_dir: Path, *, nodes: int = 1, gpus_per_node: int = 0, **overrides
) -> ApplianceSettings:
    """Settings for a private local cluster under `state_dir` on free ports."""
    cluster = {
        "name": "t" + uuid.uuid4().hex[:8],
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "controller_port": free_port(),
        "node_port_base": free_port_block(nodes),
        "kill_wait_s": 2,
        **overrides.pop("cluster", {}),
    }
    return load_settings(state_dir=state_dir, cluster=cluster, **overrides)


def write_config(settings: ApplianceSettings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path


@contextlib.contextmanager
def running_gateway(settings: ApplianceSettings, timeout: float = 60.0) -> Iterator[str]:
    """Run `appliance gateway` as a subprocess; yields its base URL; on exit stops the gateway,
    then cancels every instance job it started and waits for them to end."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(settings, settings.state_dir / "gateway-config.yaml")
    log_path = settings.state_dir / "gateway-test.log"
    url = f"http://127.0.0.1:{settings.gateway.port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.cli.main",
                "--config",
                str(config),
                "gateway",
                "--host",
                "127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{tail(log_path, 40)}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not healthy after {timeout} s:\n{tail(log_path, 40)}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        cancel_instances(settings)


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


@contextlib.contextmanager
def local_cluster(settings: ApplianceSettings) -> Iterator[ApplianceSettings]:
    """Start the local Slurm cluster described by `settings`; always stop it on exit."""
    from appliance.slurm.local_cluster import LocalCluster

    cluster = LocalCluster(settings)
    try:
        cluster.up()
        yield settings
    finally:
        cluster.down()
