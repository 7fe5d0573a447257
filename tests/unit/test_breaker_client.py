"""The gateway's side of the breaker: the ssh command it runs, its private socket directory, and
how refusals and unreachable clusters are worded (the real path runs in
tests/integration/test_breaker_ssh.py)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from appliance.config import ConfigError, load_settings
from appliance.config.breaker import BreakerSettings
from appliance.serving.access import TransportLost
from appliance.serving.breaker import client as breaker_client
from appliance.serving.breaker.client import BreakerClient, BreakerError, _failure, control_dir
from appliance_dev.stack import write_config


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
    argv = BreakerClient(settings(port=2222), 1 << 20).argv("list-instances")
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
    unshared = BreakerClient(settings(control_persist_s=0), 1 << 20).argv("ping")
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
    """Runs a command in place of ssh: one for the shared connection, one for its own (the real
    `appliance breaker serve` in session mode, or a shell snippet)."""

    def __init__(self, shared: list[str], own: list[str]):
        super().__init__(settings(), max_request_bytes=1 << 20)
        self.commands = {True: shared, False: own}
        self.sessions: list[bool] = []

    def argv(self, line: str, shared: bool = True) -> list[str]:
        assert line == "session"
        self.sessions.append(shared)
        return self.commands[shared]


def sh(snippet: str) -> list[str]:
    return ["sh", "-c", snippet]


@pytest.fixture
def breaker_serve(tmp_path, monkeypatch) -> list[str]:
    """The real forced command, for a cluster side whose Slurm is absent (ping needs none)."""
    config = write_config(load_settings(state_dir=str(tmp_path / "state")), tmp_path / "c.yaml")
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "session")
    return [sys.executable, "-m", "appliance.cli.main", "--config", str(config), "breaker", "serve"]


MUX_REFUSED = sh("echo 'mux_client_request_session: Session open refused by peer' >&2; exit 255")


async def _calls(client: BreakerClient, *lines: str) -> list:
    try:
        results = []
        for line in lines:
            try:
                results.append(await client.call(line))
            except BreakerError as exc:
                results.append(str(exc))
        return results
    finally:
        await client.close()


def test_commands_share_one_session_and_a_refusal_leaves_it_open(breaker_serve):
    ssh = ScriptedSsh(breaker_serve, sh("exit 255"))
    answers = asyncio.run(_calls(ssh, "ping", "ping; id", "start no-such-model", "ping"))
    assert answers[0] == answers[3] == {"pong": True}
    assert "refused ping;: command has characters or spacing" in answers[1]
    assert answers[2] == "the breaker refused start: unknown model"
    assert ssh.sessions == [True]


def test_a_session_the_shared_connection_refuses_runs_on_a_connection_of_its_own(breaker_serve):
    ssh = ScriptedSsh(MUX_REFUSED, breaker_serve)
    assert asyncio.run(_calls(ssh, "ping")) == [{"pong": True}]
    assert ssh.sessions == [True, False]


def test_a_session_that_ends_fails_its_requests_and_the_next_command_opens_another(
    breaker_serve,
):
    async def scenario():
        ssh = ScriptedSsh(breaker_serve, sh("exit 255"))
        try:
            channel = await ssh.channel()
            # A request in flight when the session's process dies.
            call = channel.start("forward 7 GET /health")
            channel.proc.kill()
            with pytest.raises(TransportLost):
                await asyncio.wait_for(call.head, 10)
            assert await ssh.call("ping") == {"pong": True}
            assert ssh.sessions == [True, True] and (await ssh.channel()) is not channel
        finally:
            await ssh.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "own,words",
    [
        (
            "echo 'refused: unknown verb' >&2; exit 64",
            "unknown verb",  # a breaker of an earlier release
        ),
        ("echo 'not frames at all'; sleep 2", "cannot reach|garbled|refused"),
    ],
)
def test_a_breaker_that_cannot_hold_a_session_is_a_breaker_error(own, words):
    with pytest.raises(BreakerError, match=words):
        asyncio.run(_calls_raising(ScriptedSsh(MUX_REFUSED, sh(own)), "ping"))


async def _calls_raising(client: BreakerClient, line: str) -> dict:
    try:
        return await client.call(line)
    finally:
        await client.close()


def test_a_silent_breaker_times_out_and_is_stopped():
    ssh = ScriptedSsh(sh("exec sleep 60"), sh("exit 255"))
    ssh.start_timeout_s = 2
    started = time.monotonic()
    with pytest.raises(BreakerError, match="did not answer"):
        asyncio.run(_calls_raising(ssh, "ping"))
    assert ssh.sessions == [True] and time.monotonic() - started < 10
