"""`appliance upgrade` over a state directory made by release 0.1.0 (tests/fixtures/state-v0,
schema 0): the gateway refuses it before, the upgrade takes a backup and records the schema,
then a gateway on it takes the key and the password, answers every query with the same
documents, keeps the conversation and the fine-tuning job, and the audit chain verifies. A
state newer than the code is refused. Real gateway, Chroma, embedder and Slurm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from appliance.layout import make_private
from appliance.state_version import SCHEMA_VERSION, read_record, write_record
from appliance_dev.stack import run_cli, running_gateway, write_config
from tests.slurm_fixtures import stack_settings

pytestmark = [pytest.mark.slurm]

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_a_state_of_the_previous_release_opens_and_answers_after_upgrade(slurm_cluster, tmp_path):
    expected = json.loads((FIXTURES / "state-v0.json").read_text())
    catalog = f"models:\n  - name: absent\n    source: dir:{tmp_path / 'nothing'}\n"
    settings = stack_settings(slurm_cluster, tmp_path, catalog)
    shutil.copytree(FIXTURES / "state-v0", settings.state_dir)
    make_private(settings.state_dir)  # as the services keep it (git checks files out 0644)
    config = write_config(settings, tmp_path / "config.yaml")

    refused = run_cli(config, "gateway", "--host", "127.0.0.1")
    assert refused.returncode != 0 and "run `appliance upgrade`" in refused.stderr, refused

    dry = run_cli(config, "upgrade", "--dry-run")
    assert dry.returncode == 0 and "step 0 -> 1" in dry.stdout, dry.stderr
    assert read_record(settings.state_dir) is None

    backups = tmp_path / "backups"
    done = run_cli(config, "upgrade", "--backup-dir", str(backups))
    assert done.returncode == 0, done.stderr
    (backup,) = backups.iterdir()
    assert f"backup taken first: {backup}" in done.stdout
    assert read_record(settings.state_dir).version == SCHEMA_VERSION
    checked = run_cli(config, "backup", "verify", str(backup))
    assert checked.returncode == 0 and "backup intact" in checked.stdout, checked.stderr

    key, kb = expected["key"], expected["knowledge_base"]
    with running_gateway(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.headers["authorization"] = f"Bearer {key}"
        me = client.get("/v1/me")
        assert me.status_code == 200 and me.json()["user"] == expected["user"], me.text
        body = {"username": expected["user"], "password": expected["password"]}
        signed_in = httpx.post(url + "/v1/auth/sign_in", json=body, timeout=120)
        assert signed_in.status_code == 200, signed_in.text
        for query, answers in expected["answers"].items():
            resp = client.post(
                f"/v1/knowledge_bases/{kb}/query",
                json={"query": query, "top_k": len(answers)},
            )
            assert resp.status_code == 200, resp.text
            assert [[h["filename"], h["text"]] for h in resp.json()["data"]] == answers, query
        saved = client.get(f"/v1/conversations/{expected['conversation']}")
        assert saved.status_code == 200 and saved.json()["title"] == "boiler", saved.text
        job = client.get(f"/v1/fine_tuning/jobs/{expected['job']}")
        assert job.status_code == 200 and job.json()["id"] == expected["job"], job.text

    audit = run_cli(config, "audit", "verify")
    assert audit.returncode == 0 and "audit log intact" in audit.stdout, audit.stderr

    # A state written by a newer release: the gateway and the CLI leave it alone.
    write_record(settings.state_dir, SCHEMA_VERSION + 1)
    for args in (("gateway", "--host", "127.0.0.1"), ("upgrade",), ("audit", "verify")):
        newer = run_cli(config, *args)
        assert newer.returncode != 0 and "newer than the version" in newer.stderr, (args, newer)
