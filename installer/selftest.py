"""The installer's self-test: a chat answer, a knowledge-base answer with its source, a metrics
scrape and the web app, through the installed services as a client would use them; and where
this host runs warm standbys, that they listen and whether the chat's instance came from one;
with kept engines, that the chat's next instance takes its engine and answers as before."""

from __future__ import annotations

import datetime as dt
import time

import httpx
from appliance.installer.report import Report
from appliance.security.api_keys import ApiKeyStore

from appliance.daemon import listening
from appliance.serving.standby import STARTED_BY_STANDBY, TOOK_KEPT_ENGINE

KB = "installer-self-test"
DOCUMENT = (
    "Installation note. The appliance on this server was installed by the installer. "
    "The self-test code word is AMBER-7731. Questions about the code word refer to this note.\n"
)
CHAT_TIMEOUT_S = 600  # the first request starts an instance (scale from zero)
STOP_TIMEOUT_S = 120  # an instance stopped through the gateway: its job gone from Slurm


def self_test(settings, chat_model: str | None, report: Report) -> bool:
    """Run every check; print a line each and return whether all passed. A short-lived key is
    made for the test and revoked after it."""

    keys = ApiKeyStore(settings.api_keys_file)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)
    key, record = keys.create("installer-self-test", role="admin", expires_at=expires)
    client = httpx.Client(
        base_url=settings.gateway_url,
        headers={"authorization": f"Bearer {key}"},
        verify=settings.tls_verify,
        timeout=CHAT_TIMEOUT_S,
    )
    results = []
    checks = [("chat completion", lambda: _chat(client, chat_model))]
    if settings.serving.standby and settings.serving.standby_nodes:
        checks.append(("warm standby", lambda: _standby(settings, chat_model)))
        if settings.serving.keeps_engines:
            checks.append(("kept engine", lambda: kept_engine(settings, client, chat_model)))
    checks += [
        ("knowledge base", lambda: _rag(client, chat_model)),
        ("metrics scrape", lambda: _metrics(client)),
        ("web app", lambda: _webapp(settings)),
    ]
    try:
        for name, check in checks:
            started = time.monotonic()
            try:
                detail = check()
                ok = True
            except (AssertionError, httpx.HTTPError, KeyError, ValueError, OSError) as exc:
                ok, detail = False, str(exc) or type(exc).__name__
            took = time.monotonic() - started
            results.append(ok)
            print(f"  [{'pass' if ok else 'FAIL'}] {name} ({took:.1f} s): {detail}", flush=True)
    finally:
        client.close()
        keys.revoke(record.key_id)
    passed = all(results)
    report.say("self-test passed" if passed else "self-test FAILED: see the lines above")
    return passed


def _chat(client: httpx.Client, model: str | None) -> str:
    text = _answer(client, model)
    return f"{model} answered {text.strip()[:40]!r}"


def _answer(client: httpx.Client, model: str | None) -> str:
    """The chat model's greedy answer to a fixed question."""
    assert model, "no chat model installed"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:300]}"
    text = resp.json()["choices"][0]["message"]["content"]
    assert text.strip(), "empty answer"
    return text


def _instances(client: httpx.Client, model: str) -> list[dict]:
    resp = client.get("/admin/instances")
    resp.raise_for_status()
    return [i for i in resp.json()["instances"] if i["model"] == model]


def kept_engine(settings, client: httpx.Client, model: str | None) -> str:
    """The chat's instances stopped and the chat asked again: the next instance takes the
    engine the node's standby kept, loads the weights into it, and answers as the first did
    (greedy decoding). An instance started afresh passes with a note (Slurm may give it other
    GPUs); another answer fails."""
    before = _answer(client, model)
    assert model  # _answer checked it
    for inst in _instances(client, model):
        client.post(f"/admin/instances/{inst['job_id']}/stop").raise_for_status()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _instances(client, model):
        assert time.monotonic() < deadline, (
            f"the chat's instance did not stop in {STOP_TIMEOUT_S} s"
        )
        time.sleep(0.5)
    started = time.monotonic()
    after = _answer(client, model)
    took = time.monotonic() - started
    newest = max(_instances(client, model), key=lambda i: int(i["job_id"]))
    log = settings.log_dir / f"instance-{model}-{newest['job_id']}.log"
    if TOOK_KEPT_ENGINE not in log.read_text(errors="replace"):
        return f"the next instance started afresh in {took:.1f} s (no engine kept for it; {log})"
    assert after == before, f"after the claim it answered {after!r}, before {before!r}"
    return f"the next instance took the kept engine: answered alike {took:.1f} s after the request"


def _standby(settings, model: str | None) -> str:
    """Every standby of this host listens; says whether the chat's instance (the newest of its
    model) started through one: an instance already running from before the standby did not."""
    nodes = settings.serving.standby_nodes
    sockets = {node: settings.standby_socket(node) for node in nodes}
    silent = [f"{node} ({path})" for node, path in sockets.items() if not listening(path)]
    assert not silent, f"not listening: {', '.join(silent)}"
    listens = f"listening for {', '.join(nodes)}"
    logs = sorted(settings.log_dir.glob(f"instance-{model}-*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return listens
    if STARTED_BY_STANDBY in logs[-1].read_text(errors="replace"):
        return f"{listens}; the chat's instance started through it"
    return f"{listens}; the chat's instance started without it (see {logs[-1]})"


def _rag(client: httpx.Client, model: str | None) -> str:
    client.delete(f"/v1/knowledge_bases/{KB}")  # left over from an interrupted run
    resp = client.post("/v1/knowledge_bases", json={"name": KB})
    assert resp.status_code == 201, f"HTTP {resp.status_code}: {resp.text[:300]}"
    try:
        files = [("files", ("install-note.md", DOCUMENT.encode(), "text/markdown"))]
        resp = client.post(f"/v1/knowledge_bases/{KB}/documents", files=files)
        assert resp.status_code == 200 and not resp.json()["errors"], resp.text[:300]
        body = {
            "model": model,
            "max_tokens": 16,
            "knowledge_bases": [KB],
            "messages": [{"role": "user", "content": "What is the self-test code word?"}],
        }
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:300]}"
        data = resp.json()
        sources = data.get("citations") or data.get("sources") or []
        assert sources and sources[0]["filename"] == "install-note.md", f"sources: {sources}"
        return "answered with the ingested document as its source"
    finally:
        client.delete(f"/v1/knowledge_bases/{KB}")


def _metrics(client: httpx.Client) -> str:
    resp = client.get("/metrics")
    assert resp.status_code == 200, f"HTTP {resp.status_code}"
    families = {line.split()[2] for line in resp.text.splitlines() if line.startswith("# TYPE ")}
    for needed in ("node_cpu_seconds_total", "node_memory_MemTotal_bytes", "slurm_node_cpus_total"):
        assert any(f.startswith(needed.rsplit("_", 1)[0]) for f in families), f"no {needed}"
    return f"{len(families)} metric families"


def _webapp(settings) -> str:
    resp = httpx.get(settings.webapp_url + "/", verify=settings.tls_verify, timeout=30)
    assert resp.status_code == 200, f"HTTP {resp.status_code}"
    return settings.webapp_url
