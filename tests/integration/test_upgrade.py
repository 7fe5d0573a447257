"""`appliance upgrade` over a state directory made by release 0.1.0 (tests/fixtures/state-v0,
schema 0): the gateway refuses it before, the upgrade takes a backup and records the schema,
then a gateway on it takes the key and the password, answers every query with the same
documents, keeps the conversation and the fine-tuning job, and the audit chain verifies. A
state newer than the code is refused. Real gateway, Chroma, embedder and Slurm."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from appliance.layout import make_private
from appliance.state_version import SCHEMA_VERSION, read_record, write_record
from appliance_dev.stack import running_gateway, write_config
from tests.slurm_fixtures import stack_settings

pytestmark = [pytest.mark.slurm]

FIXTURES = Path(__file__).parents[1] / "fixtures"


def appliance(config: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def call(url: str, key: str, method: str, path: str, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.request(method, url + path, headers=headers, timeout=120, **kw)


def test_a_state_of_the_previous_release_opens_and_answers_after_upgrade(slurm_cluster, tmp_path):
    expected = json.loads((FIXTURES / "state-v0.json").read_text())
    catalog = f"models:\n  - name: absent\n    source: dir:{tmp_path / 'nothing'}\n"
    settings = stack_settings(slurm_cluster, tmp_path, catalog)
    shutil.copytree(FIXTURES / "state-v0", settings.state_dir)
    make_private(settings.state_dir)  # as the services keep it (git checks files out 0644)
    config = write_config(settings, tmp_path / "config.yaml")

    refused = appliance(config, "gateway", "--host", "127.0.0.1")
    assert refused.returncode != 0 and "run `appliance upgrade`" in refused.stderr, refused

    dry = appliance(config, "upgrade", "--dry-run")
    assert dry.returncode == 0 and "step 0 -> 1" in dry.stdout, dry.stderr
    assert read_record(settings.state_dir) is None

    backups = tmp_path / "backups"
    done = appliance(config, "upgrade", "--backup-dir", str(backups))
    assert done.returncode == 0, done.stderr
    (backup,) = backups.iterdir()
    assert f"backup taken first: {backup}" in done.stdout
    assert read_record(settings.state_dir).version == SCHEMA_VERSION
    checked = appliance(config, "backup", "verify", str(backup))
    assert checked.returncode == 0 and "backup intact" in checked.stdout, checked.stderr

    key, kb = expected["key"], expected["knowledge_base"]
    with running_gateway(settings) as url:
        me = call(url, key, "GET", "/v1/me")
        assert me.status_code == 200 and me.json()["user"] == expected["user"], me.text
        body = {"username": expected["user"], "password": expected["password"]}
        signed_in = httpx.post(url + "/v1/auth/sign_in", json=body, timeout=60)
        assert signed_in.status_code == 200, signed_in.text
        for query, answers in expected["answers"].items():
            resp = call(
                url,
                key,
                "POST",
                f"/v1/knowledge_bases/{kb}/query",
                json={"query": query, "top_k": len(answers)},
            )
            assert resp.status_code == 200, resp.text
            assert [[h["filename"], h["text"]] for h in resp.json()["data"]] == answers, query
        saved = call(url, key, "GET", f"/v1/conversations/{expected['conversation']}")
        assert saved.status_code == 200 and saved.json()["title"] == "pump", saved.text
        job = call(url, key, "GET", f"/v1/fine_tuning/jobs/{expected['job']}")
        assert job.status_code == 200 and job.json()["id"] == expected["job"], job.text

    audit = appliance(config, "audit", "verify")
    assert audit.returncode == 0 and "audit log intact" in audit.stdout, audit.stderr

    # A state written by a newer release: the gateway and the CLI leave it alone.
    write_record(settings.state_dir, SCHEMA_VERSION + 1)
    for args in (("gateway", "--host", "127.0.0.1"), ("upgrade",), ("audit", "verify")):
        newer = appliance(config, *args)
        assert newer.returncode != 0 and "newer than the version" in newer.stderr, (args, newer)
