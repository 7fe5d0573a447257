"""Folder sync through the real gateway and Chroma: `appliance kb sync` across edits, renames
and deletions (queries find the new text, never the old), and hostile paths refused clearly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    # Small: the CLI must split a sync into several requests.
    rag = {"max_upload_bytes": 64 * 1024}
    settings = stack_settings(slurm_cluster, tmp, tiny_catalog(tiny_model_dir), rag=rag)
    key = ApiKeyStore(settings.api_keys_file).create("alice")[0]
    with running_gateway(settings) as url:
        config = settings.state_dir / "gateway-config.yaml"
        yield url, key, config


def call(stack, method: str, path: str, **kw) -> httpx.Response:
    url, key, _ = stack
    return httpx.request(
        method, url + path, headers={"authorization": f"Bearer {key}"}, timeout=300, **kw
    )


def sync_cli(stack, folder: Path) -> subprocess.CompletedProcess:
    _, key, config = stack
    argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), "kb", "sync"]
    env = {**os.environ, "APPLIANCE_API_KEY": key}
    return subprocess.run(
        [*argv, "docs", str(folder)], capture_output=True, text=True, timeout=300, env=env
    )


def outcomes(run: subprocess.CompletedProcess) -> dict[str, str]:
    lines = [line.split(None, 1) for line in run.stdout.splitlines()[:-1]]
    return {name.split(":")[0]: status for status, name in lines}


def found(stack, query: str) -> list[tuple[str, str]]:
    resp = call(stack, "POST", "/v1/knowledge_bases/docs/query", json={"query": query, "top_k": 20})
    assert resp.status_code == 200, resp.text
    return [(hit["filename"], hit["text"]) for hit in resp.json()["data"]]


def test_sync_follows_edits_renames_and_deletions(stack, tmp_path: Path):
    assert call(stack, "POST", "/v1/knowledge_bases", json={"name": "docs"}).status_code == 201
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Alpha\n\nThe alpha valve part is ZQ-1001.\n")
    (folder / "sub" / "b.txt").write_text("Bravo notes: the bravo pump is ZQ-2002.\n")
    (folder / "c.txt").write_text("Charlie: the charlie seal is ZQ-3003.\n")
    (folder / ".hidden").write_text("never sent")
    for n in range(30):  # more than one request's worth under the 64 KiB limit
        (folder / "bulk" / f"{n:02d}.txt").parent.mkdir(exist_ok=True)
        (folder / "bulk" / f"{n:02d}.txt").write_text(f"Bulk file {n} says BK-{n:04d}. " * 100)

    first = sync_cli(stack, folder)
    assert first.returncode == 0, first.stdout + first.stderr
    assert set(outcomes(first).values()) == {"added"} and len(outcomes(first)) == 33
    assert found(stack, "ZQ-2002")[0][0] == "sub/b.txt"

    (folder / "a.md").write_text("# Alpha\n\nThe alpha valve part is now ZQ-1111.\n")
    (folder / "sub" / "b.txt").rename(folder / "sub" / "renamed.txt")
    (folder / "c.txt").unlink()
    (folder / "d.txt").write_text("Delta: the delta gauge is ZQ-4004.\n")
    second = sync_cli(stack, folder)
    assert second.returncode == 0, second.stdout + second.stderr
    changes = {k: v for k, v in outcomes(second).items() if v != "unchanged"}
    assert changes == {
        "a.md": "replaced",
        "c.txt": "removed",
        "d.txt": "added",
        "sub/b.txt": "removed",
        "sub/renamed.txt": "added",
    }
    assert found(stack, "ZQ-1111")[0] == ("a.md", "Alpha\nThe alpha valve part is now ZQ-1111.")
    assert found(stack, "ZQ-2002")[0][0] == "sub/renamed.txt"
    assert found(stack, "ZQ-4004")[0][0] == "d.txt"
    for old in ("ZQ-1001", "ZQ-3003", "charlie seal"):
        assert not any("1001" in text or "3003" in text for _, text in found(stack, old))
    names = [
        d["filename"]
        for d in call(stack, "GET", "/v1/knowledge_bases/docs/documents").json()["data"]
    ]
    assert "sub/b.txt" not in names and "c.txt" not in names and ".hidden" not in names

    third = sync_cli(stack, folder)
    assert third.returncode == 0 and set(outcomes(third).values()) == {"unchanged"}
    assert third.stdout.splitlines()[-1] == "33 unchanged"


def test_hostile_paths_are_refused_and_nothing_is_lost(stack, tmp_path: Path):
    before = call(stack, "GET", "/v1/knowledge_bases/docs/documents").json()["data"]
    text = b"Echo: the echo part is ZQ-5005.\n"
    digest = hashlib.sha256(text).hexdigest()
    manifest = {d["filename"]: d["source_hash"] for d in before}
    hostile = [
        "../x.txt",
        "/etc/passwd",
        "a/../../b.txt",
        "x" * 300 + ".txt",
        "bad\udcff.txt",
        "c\\d.txt",
    ]
    manifest.update({name: digest for name in hostile})
    parts = [("manifest", ("m.json", json.dumps(manifest).encode(), "application/json"))]
    parts += [
        ("files", ("../x.txt", text, "text/plain")),
        ("files", ("stray.txt", text, "text/plain")),
    ]
    resp = call(stack, "POST", "/v1/knowledge_bases/docs/sync", files=parts)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    refused = [r for r in results if r["status"] == "refused"]
    assert len(refused) == len(hostile) + 2  # the hostile paths, the hostile file, the stray one
    assert all(r["message"] for r in refused)
    assert {r["status"] for r in results if r not in refused} == {"unchanged"}
    assert call(stack, "GET", "/v1/knowledge_bases/docs/documents").json()["data"] == before

    for bad, message in [
        ({"a.txt": "not-a-hash"}, "not a sha256"),
        (["a.txt"], "JSON object"),
    ]:
        parts = [("manifest", ("m.json", json.dumps(bad).encode(), "application/json"))]
        resp = call(stack, "POST", "/v1/knowledge_bases/docs/sync", files=parts)
        assert resp.status_code == 400 and message in resp.json()["error"]["message"]
    resp = call(stack, "POST", "/v1/knowledge_bases/docs/sync", files=[("x", ("x", b"{}"))])
    assert resp.status_code == 400 and "no manifest" in resp.json()["error"]["message"]
    resp = call(stack, "POST", "/v1/knowledge_bases/nope/sync", files=[("manifest", ("m", b"{}"))])
    assert resp.status_code == 404
    assert call(stack, "GET", "/v1/knowledge_bases/docs/documents").json()["data"] == before

    # A file name that is not UTF-8 is refused by the CLI; the rest of the folder still syncs.
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "fine.txt").write_text("Foxtrot: ZQ-6006.\n")
    with open(os.fsencode(folder) + b"/bad\xff.txt", "wb") as file:
        file.write(b"latin-1 name")
    run = sync_cli(stack, folder)
    assert (
        run.returncode == 1 and "refused   bad\\xff.txt: the path is not valid UTF-8" in run.stdout
    )
    assert outcomes(run)["fine.txt"] == "added"
