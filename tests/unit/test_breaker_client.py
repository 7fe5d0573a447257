"""The gateway's side of the breaker: the ssh command it runs, its private socket directory, and
how refusals and unreachable clusters are worded (the real path runs in
tests/integration/test_breaker_ssh.py)."""

from __future__ import annotations

import os

import pytest

from appliance.config import ConfigError, load_settings
from appliance.config.breaker import BreakerSettings
from appliance.serving import breaker_client
from appliance.serving.breaker_client import BreakerClient, BreakerError, _failure, control_dir


def settings(**extra) -> BreakerSettings:
    return BreakerSettings(enabled=True, host="head.example", identity_file="/k/id",
                           known_hosts_file="/k/known", **extra)  # fmt: skip


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
        assert option in joined  # fmt: skip
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
