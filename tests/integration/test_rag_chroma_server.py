"""Knowledge bases on a Chroma server (rag.chroma_url) instead of embedded Chroma: a real
`chroma run` on a free port; two store instances (two gateway processes) share it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from appliance.rag.document import ParsedDocument, Section
from appliance.rag.retrieval import Retriever
from appliance.rag.sniff import DocType
from appliance.rag.store import KnowledgeBaseStore
from appliance.security.api_keys import Principal

from appliance.config.rag import RagSettings
from appliance_dev.stack import free_port

pytestmark = [pytest.mark.slow]

OWNER = Principal("alice")


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    port = free_port()
    chroma = Path(sys.executable).with_name("chroma")
    proc = subprocess.Popen(
        [
            str(chroma),
            "run",
            "--path",
            str(tmp_path_factory.mktemp("chroma")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/api/v2/heartbeat", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "chroma did not start"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_two_stores_share_a_chroma_server(chroma_url, tmp_path):
    settings = RagSettings(chroma_url=chroma_url)
    # The registry lives beside each gateway; here both point at one directory, as two gateway
    # processes on one host would with a shared state directory.
    first = KnowledgeBaseStore(tmp_path, settings)
    first.create(OWNER, "manuals")
    doc = ParsedDocument(
        "pump.md",
        DocType.MARKDOWN,
        [Section("The coolant pump part number is XK-4471; replace its seal every six months.")],
    )
    [result] = first.add_documents(OWNER, "manuals", [doc])
    assert result.status == "added"
    second = KnowledgeBaseStore(tmp_path, settings)
    hits = Retriever.from_settings(second).retrieve(OWNER, ["manuals"], "XK-4471 seal")
    assert hits and hits[0].chunk.filename == "pump.md"
    second.delete(OWNER, "manuals")
    assert first.knowledge_bases(OWNER) == []
