"""An idle kept engine is outside every Slurm job, so Slurm may give its GPU to another job: the
local cluster's prolog (written with serving.keep_engines) asks the node's standby to drop it
before such a job starts, and leaves instance jobs whose server the standby starts, which ask
it themselves, alone.

A real cluster with one simulated GPU, its real prolog, and the real standby; the engine is the
standby tests' stand-in server (tests/unit/testdata/fake_server.py), kept by a job of Slurm's
as an instance job's launcher keeps it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from appliance.names import STANDBY_INSTANCE_COMMENT_PREFIX
from appliance_dev.stack import (
    free_port,
    local_cluster_settings,
    run_cli,
    running_local_cluster,
    write_config,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "prolog-test-token"


@pytest.fixture
def cluster(cluster_dir):
    """The cluster (one node, one GPU, kept engines on), its standby's socket and log, and the
    settings as a configuration file."""
    settings = local_cluster_settings(
        cluster_dir / "state",
        gpus_per_node=1,
        shards_per_gpu=0,
        serving={"standby": True, "keep_engines": "gpu"},
    )
    socket = settings.standby_socket("n1")
    log = cluster_dir / "standby.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests/unit/testdata'}"}
    argv = [sys.executable, "-m", "appliance.serving.standby", "--socket", str(socket)]
    with running_local_cluster(settings) as local, log.open("wb") as out:
        standby = subprocess.Popen(
            [*argv, "--module", "fake_server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(
                lambda: "ready on" in log.read_text() or standby.poll() is not None,
                "the standby's start",
            )
            assert standby.poll() is None, log.read_text()
            yield local, socket, log, write_config(settings, cluster_dir / "config.yaml")
        finally:
            standby.terminate()  # it drops the engines it keeps idle
            standby.wait(timeout=30)


def wait_for(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def run_job(local, *sbatch: str) -> None:
    """One job of Slurm's, to its end."""
    env = {**os.environ, "SLURM_CONF": str(local.paths.slurm_conf), "PYTHONPATH": str(REPO)}
    argv = ["sbatch", "--wait", "--gres=gpu:1", "-o", "/dev/null", *sbatch]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_job_of_slurm_s_on_the_gpu_drops_the_idle_engine_and_instance_jobs_leave_it(cluster):
    local, socket, log, config = cluster
    assert "Prolog=" in local.paths.slurm_conf.read_text()
    # An instance job's launcher: its server from the standby in keep mode, kept when it ends.
    launcher = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from appliance.serving.standby import StandbyServer
        env = {{**os.environ, "APPLIANCE_KEPT_ENGINE_TOKEN": "{TOKEN}"}}
        argv = ["--port", "{free_port()}", "--http"]
        server = StandbyServer.start(Path("{socket}"), argv, env, keep={{"key": "k"}})
        server.stdout.readline()
        print(server.pid)
        """
    )
    run_job(
        local,
        f"--comment={STANDBY_INSTANCE_COMMENT_PREFIX}tiny",
        "--wrap",
        f"{sys.executable} -c '{launcher}'",
    )
    wait_for(lambda: "kept for the next job" in log.read_text(), "the engine kept")
    pid = int(log.read_text().split("engine ")[1].split()[0])
    assert alive(pid)
    listed = run_cli(config, "standby", "engines", "--node", "n1")
    assert listed.returncode == 0, listed.stderr
    assert str(pid) in listed.stdout and "idle" in listed.stdout, listed.stdout

    run_job(local, f"--comment={STANDBY_INSTANCE_COMMENT_PREFIX}other", "--wrap", "true")
    assert alive(pid)  # a job through the standby asks it itself, which hands over or drops
    run_job(local, "--wrap", "true")  # batch work on the engine's GPU
    assert not alive(pid)  # the prolog waits until the engine is gone
    assert "dropped: a job of Slurm's has its GPUs" in log.read_text()
    assert "no kept engines" in run_cli(config, "standby", "engines", "--node", "n1").stdout
