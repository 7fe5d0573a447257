"""A full disk under the encrypted data volume (security.data_at_rest): its ciphertext on a
small tmpfs, filled up. Uploads and conversation saves through the real gateway get a clear
507, nothing stored before is lost or damaged (documents listed, a query still answers, a
saved conversation reads as it was), and once space is freed the same requests succeed."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore
from appliance.security.data_volume import close_volume

from appliance.cli.main import main as cli
from appliance.state_version import SCHEMA_VERSION, write_record
from appliance.store.keyring import init_keys
from appliance_dev.stack import running_gateway, write_config
from tests.slurm_fixtures import stack_settings
from tests.tmpfs import tiny_tmpfs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PUMP = "# Pump\n\nThe coolant pump part number is XK-4471. Replace its seal every six months.\n"
FAN = "# Fan\n\nThe exhaust fan runs at 1200 rpm and its filter is changed in March.\n"


def fill(folder: Path) -> Path:
    """A file in `folder` that takes what space is left on its disk."""
    filler = folder / "filler"
    block = os.urandom(64 * 1024)
    with filler.open("wb") as out:
        try:
            while True:
                out.write(block)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@contextlib.contextmanager
def bound(disk: Path, path: Path, name: str) -> Iterator[None]:
    """`path` a bind mount of the folder `name` of `disk`, undone on the way out."""
    (disk / name).mkdir()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(disk / name), str(path)], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


@pytest.fixture
def stack(slurm_cluster):
    """A gateway with data at rest on, the ciphertext of the data volume and of the knowledge
    bases' volumes on one 3 MiB tmpfs (as on one disk); every mount undone at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    top = Path(tempfile.mkdtemp(prefix="appliance-full-", dir="/var/tmp"))
    security = {"data_at_rest": {"enabled": True}}
    # torch: no ONNX export of the embedding model, whose scratch files would be in the volume.
    rag = {"embedding_backend": "torch"}
    settings = stack_settings(slurm_cluster, top, "models: []\n", security=security, rag=rag)
    config = write_config(settings, top / "config.yaml")
    init_keys(settings)
    write_record(settings.state_dir, SCHEMA_VERSION)
    key = ApiKeyStore(settings.api_keys_file).create("alice")[0]
    try:
        with (
            tiny_tmpfs(top / "disk", "3m") as disk,
            bound(disk, settings.layout.vault, "vault"),
            bound(disk, settings.layout.kb_volumes, "kb-volumes"),
        ):
            try:
                assert cli(["--config", str(config), "data", "init"]) == 0
                with running_gateway(settings) as url:
                    yield (
                        settings,
                        httpx.Client(
                            base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=300
                        ),
                    )
            finally:
                close_volume(settings)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def upload(client: httpx.Client, name: str, text: str) -> httpx.Response:
    files = [("files", (name, text.encode(), "text/markdown"))]
    return client.post("/v1/knowledge_bases/docs/documents", files=files)


def test_a_full_data_volume_refuses_writes_and_keeps_what_it_holds(stack):
    settings, client = stack
    assert client.post("/v1/knowledge_bases", json={"name": "docs"}).status_code == 201
    assert upload(client, "pump.md", PUMP).status_code == 200
    saved = {"title": "t", "messages": [{"role": "user", "content": "hello"}]}
    assert client.put("/v1/conversations/c1", json=saved).status_code == 200

    filler = fill(settings.layout.data)
    try:
        refused = upload(client, "fan.md", FAN)
        assert refused.status_code == 507, refused.text
        assert "full" in refused.json()["error"]["message"]
        changed = {"title": "t2", "messages": [{"role": "user", "content": "x" * 200_000}]}
        for conversation in ("c1", "c2"):
            refused = client.put(f"/v1/conversations/{conversation}", json=changed)
            assert refused.status_code == 507, refused.text

        # Nothing stored before is lost or damaged.
        assert client.get("/v1/conversations/c1").json()["messages"] == saved["messages"]
        assert client.get("/v1/conversations/c2").status_code == 404
        listed = client.get("/v1/knowledge_bases/docs/documents").json()["data"]
        assert [d["filename"] for d in listed] == ["pump.md"]
        found = client.post("/v1/knowledge_bases/docs/query", json={"query": "pump part number"})
        assert found.status_code == 200 and "XK-4471" in found.text, found.text
    finally:
        filler.unlink()

    # Space freed: the same requests succeed.
    assert upload(client, "fan.md", FAN).status_code == 200
    assert client.put("/v1/conversations/c2", json=changed).status_code == 200
    listed = client.get("/v1/knowledge_bases/docs/documents").json()["data"]
    assert sorted(d["filename"] for d in listed) == ["fan.md", "pump.md"]
