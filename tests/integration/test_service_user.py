"""Services started by root run as the configured unprivileged account: the gateway gives up
root for good, owns the state it writes, and the instance it starts on Slurm runs as that
account too; a chat answer still comes back."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import openai
import psutil
import pytest

from appliance.serving.endpoint import endpoint_path
from appliance_dev.stack import running_gateway
from tests.local_accounts import reachable, system_account
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]
ACCOUNT = "appliance-svc"


@pytest.fixture(scope="module")
def account():
    if os.geteuid() != 0:
        pytest.skip("only root can hand services to another account")
    return system_account(ACCOUNT)


@pytest.fixture
def public_tmp():
    path = Path(tempfile.mkdtemp(prefix="appliance-svc-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_gateway_and_its_instances_run_unprivileged(
    slurm_cluster, tiny_model_dir, public_tmp, account
):
    tmp = public_tmp
    settings = stack_settings(
        slurm_cluster, tmp, tiny_catalog(tiny_model_dir), security={"service_user": ACCOUNT}
    )
    # Made by root before the start (as an earlier install would have): handed over too.
    settings.audit_dir.mkdir(parents=True)
    (settings.audit_dir / "old.jsonl").write_text("")
    with (
        reachable(settings.slurm_conf),
        reachable(tiny_model_dir / "config.json"),
        reachable(Path(os.__file__)),  # this Python may live under /root (pyenv)
        running_gateway(settings) as url,
    ):
        (conn,) = [
            c
            for c in psutil.net_connections("tcp")
            if c.laddr.port == settings.gateway.port and c.status == "LISTEN"
        ]
        uids = psutil.Process(conn.pid).uids()
        assert set(uids) == {account.pw_uid}, uids  # real, effective and saved: no way back
        assert psutil.Process(conn.pid).gids().effective == account.pw_gid

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
        answer = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert answer.choices[0].message.content
        # The instance job was submitted by the account, so it runs (and writes) as it.
        (endpoint,) = list(settings.instances_dir.glob("*.json"))
        assert endpoint.stat().st_uid == account.pw_uid
        job_id = int(endpoint.stem)
        assert endpoint_path(settings.instances_dir, job_id) == endpoint
        squeue = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%u"],
            env={**os.environ, "SLURM_CONF": str(settings.slurm_conf)},
            capture_output=True,
            text=True,
            check=True,
        )
        assert squeue.stdout.strip() == ACCOUNT
    for path in (settings.audit_dir / "old.jsonl", settings.audit_dir, settings.log_dir):
        assert path.stat().st_uid == account.pw_uid, path
    # What the account's processes write is private to it (umask 077, passed on to its jobs).
    assert endpoint.stat().st_mode & 0o077 == 0
