"""The gateway's side of the breaker: the ssh command it runs, its private socket directory, and
how refusals and unreachable clusters are worded (the real path runs in
tests/integration/test_breaker_ssh.py)."""

from __future__ import annotations

import asyncio
import os

import pytest

from appliance.config import ConfigError, load_settings
from appliance.config.breaker import BreakerSettings
from appliance.serving.breaker import client as breaker_client
from appliance.serving.breaker.client import BreakerClient, BreakerError, _failure, control_dir


def settings(**extra) -> BreakerSettings:
    return BreakerSettings(
        enabled=True,
        host="head.example",
        identity_file="/k/id",
        known_hosts_file="/k/known",
        **extra,
    )


def test_ssh_checks_the_host_key_and_asks_for_nothing_but_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(breaker_client.tempfile, "gettempdir", lambda: str(tmp_path))
    argv = BreakerClient(settings(port=2222)).argv("list-instances")
    joined = " ".join(argv)
    for option in (
        "StrictHostKeyChecking=yes",
        "UserKnownHostsFile=/k/known",
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "ClearAllForwardings=yes",
        "ControlMaster=auto",
    ):
        assert option in joined
    assert argv[-3:] == ["--", "appliance@head.example", "list-instances"]
    assert "-T" in argv and "-a" in argv and "-x" in argv
    unshared = BreakerClient(settings(control_persist_s=0)).argv("ping")
    assert "ControlPath=none" in " ".join(unshared)


def test_the_socket_directory_must_be_private(tmp_path, monkeypatch):
    monkeypatch.setattr(breaker_client.tempfile, "gettempdir", lambda: str(tmp_path))
    path = control_dir()
    assert path.stat().st_mode & 0o777 == 0o700
    os.chmod(path, 0o755)
    with pytest.raises(BreakerError, match="not a private directory"):
        control_dir()


def test_failures_say_whether_the_cluster_refused_or_was_not_reached():
    assert _failure("start x", 64, b"refused: unknown model\n") == (
        "the breaker refused start: unknown model"
    )
    unreachable = _failure("ping", 255, b"ssh: connect to host h port 22: Connection refused\n")
    assert (
        unreachable == "cannot reach the cluster's breaker: ssh: connect to host h port 22: "
        "Connection refused"
    )


def test_enabling_the_breaker_needs_a_host_a_key_and_the_host_key():
    with pytest.raises(ConfigError, match="host, identity_file, known_hosts_file"):
        load_settings(breaker={"enabled": True})


class ScriptedSsh(BreakerClient):
    """Runs a shell snippet in place of ssh: one for the shared connection, one for its own."""

    def __init__(self, shared: str, own: str):
        super().__init__(settings())
        self.snippets = {True: shared, False: own}
        self.sessions: list[bool] = []

    def argv(self, line: str, shared: bool = True) -> list[str]:
        self.sessions.append(shared)
        return ["sh", "-c", self.snippets[shared]]


MUX_REFUSED = "echo 'mux_client_request_session: Session open refused by peer' >&2; exit 255"


def test_a_session_the_shared_connection_refuses_runs_on_a_connection_of_its_own():
    ssh = ScriptedSsh(MUX_REFUSED, "cat >/dev/null; echo '{\"pong\": true}'")
    assert asyncio.run(ssh.call("ping")) == {"pong": True}
    assert ssh.sessions == [True, False]


@pytest.mark.parametrize(
    "own,words",
    [
        ("echo 'refused: unknown model' >&2; exit 64", "the breaker refused start: unknown model"),
        ("echo 'not json'", "is not JSON"),
        ("echo '{}'; echo 'refused: late' >&2; exit 64", "refused start: late"),
    ],
)
def test_refusals_and_garbled_answers_are_breaker_errors(own, words):
    with pytest.raises(BreakerError, match=words):
        asyncio.run(ScriptedSsh(MUX_REFUSED, own).call("start x"))


def test_a_refusal_on_the_shared_connection_is_not_retried():
    ssh = ScriptedSsh("echo 'refused: unknown verb' >&2; exit 64", "echo '{}'")
    with pytest.raises(BreakerError, match="unknown verb"):
        asyncio.run(ssh.call("x"))
    assert ssh.sessions == [True]


def test_a_silent_breaker_times_out_and_is_stopped():
    ssh = ScriptedSsh("exec sleep 30", "exec sleep 30")
    with pytest.raises(BreakerError, match="did not answer"):
        asyncio.run(ssh.call("ping", timeout=0.5))
    assert ssh.sessions == [True]
