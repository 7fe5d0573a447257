"""Another local account can read nothing of the appliance's state: the gateway, started on a
state directory an older version left world-readable, makes it private (0700, 0600), and what it
writes after is private too. Checked as a real second account; real gateway, real Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance_dev.stack import running_gateway
from tests.local_accounts import as_outsider
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm]


@pytest.fixture
def public_tmp():
    """A folder every account can pass through, as /var/lib is on an installed system."""
    path = Path(tempfile.mkdtemp(prefix="appliance-private-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_another_account_reads_nothing_of_the_state(
    slurm_cluster, tiny_model_dir, public_tmp, outsider
):
    settings = stack_settings(slurm_cluster, public_tmp, tiny_catalog(tiny_model_dir))
    state = settings.state_dir
    old = {
        "chroma": settings.rag_dir / "chroma" / "chroma.sqlite3",
        "registry": settings.rag_dir / "registry.sqlite3",
        "log": settings.log_dir / "instance-tiny-chat-7.log",
        "instance": settings.instances_dir / "7.json",
    }
    for path in old.values():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_text("a secret document")
        path.chmod(0o644)
    for directory in {state, *(p.parent for p in old.values()), settings.rag_dir}:
        directory.chmod(0o755)
    # As an older version left it: the other account reads it all.
    assert as_outsider("cat", str(old["chroma"])).stdout == "a secret document"
    assert as_outsider("ls", str(state)).returncode == 0

    with running_gateway(settings):
        for what, path in old.items():
            refused = as_outsider("cat", str(path))
            assert refused.returncode != 0 and "secret" not in refused.stdout, what
            assert path.stat().st_mode & 0o077 == 0, what
        listed = as_outsider("ls", str(state))
        assert listed.returncode != 0 and "Permission denied" in listed.stderr
        assert state.stat().st_mode & 0o777 == 0o700
        # Everything else there, old or written by the gateway since (its umask is 077), too.
        for path in state.rglob("*"):
            if not path.is_symlink():
                assert path.stat().st_mode & 0o077 == 0, path


def test_an_instance_jobs_log_is_private(slurm_cluster, tmp_path):
    """slurmstepd creates the job's --output file itself, with the umask sbatch passed on:
    the gateway's 077 (run_privately), so the log is 0600 like everything else."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    env = {**os.environ, "SLURM_CONF": str(slurm_cluster.slurm_conf)}
    submit = ["sbatch", "--parsable", "--wait", f"--output={logs}/job-%j.log", "--wrap", "echo hi"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120, umask=0o077)
    assert done.returncode == 0, done.stderr
    (log,) = logs.glob("job-*.log")
    assert log.read_text().strip() == "hi"
    assert log.stat().st_mode & 0o777 == 0o600
