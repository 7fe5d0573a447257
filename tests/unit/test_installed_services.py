"""An installed appliance's services: which units run (each GPU node's store service, and its
warm standby while serving.standby is on), what `appliance services` does with a standby that
was turned off, and the supervisor's children where systemd does not run; the standby and the
store service run as the instance jobs' account; uninstalling removes them; the self-test
reports them."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from appliance.installer import selftest
from appliance.installer import uninstall as uninstaller
from appliance.installer.manifest import Manifest
from appliance.security import privileges
from click.testing import CliRunner

from appliance import services
from appliance.cli.context import CliContext
from appliance.cli.standby import standby_group
from appliance.cli.store import store_group
from appliance.config import load_settings
from appliance.errors import ApplianceError
from appliance.services import ServiceManager
from appliance.serving import standby
from appliance.serving.standby import STARTED_BY_STANDBY
from appliance.supervisor import Supervisor


def _settings(tmp_path, serving: str = "", mode: str = "local"):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ncluster:\n  mode: {mode}\n{serving}")
    return load_settings(config)


STANDBY_ON = "serving:\n  standby: true\n  standby_nodes: [n1, n2]\n"
STANDBY_OFF = "serving:\n  standby: false\n  standby_nodes: [n1, n2]\n"


def test_the_standbys_run_between_the_cluster_and_the_gateway(tmp_path):
    on = ServiceManager(_settings(tmp_path, STANDBY_ON), tmp_path / "config.yaml", "systemd")
    assert on.units == [
        "appliance-cluster",
        "appliance-store@n1",
        "appliance-store@n2",
        "appliance-standby@n1",
        "appliance-standby@n2",
        "appliance-gateway",
        "appliance-webapp",
    ]
    assert on.installed_units == on.units
    off = ServiceManager(_settings(tmp_path, STANDBY_OFF), tmp_path / "config.yaml", "systemd")
    # The store services run without the standbys: placement and the host tier need them.
    assert off.units == [
        "appliance-cluster",
        "appliance-store@n1",
        "appliance-store@n2",
        "appliance-gateway",
        "appliance-webapp",
    ]
    assert off.installed_units == on.units  # still stopped, disabled and uninstalled
    cpu = ServiceManager(_settings(tmp_path), tmp_path / "config.yaml", "systemd")
    assert (
        cpu.units
        == cpu.installed_units
        == [
            "appliance-cluster",
            "appliance-gateway",
            "appliance-webapp",
        ]
    )
    head = _settings(tmp_path, "serving:\n  standby: true\n", mode="existing")
    # A head without GPUs: its instances use the workers' standbys, none runs here.
    assert ServiceManager(head, tmp_path / "c", "systemd").units == [
        "appliance-gateway",
        "appliance-webapp",
    ]


def test_a_worker_runs_its_standby_and_no_gateway(tmp_path, monkeypatch):
    settings = _settings(
        tmp_path, "serving:\n  standby: true\n  standby_nodes: [gpu02]\n", "existing"
    )
    worker = ServiceManager(settings, tmp_path / "config.yaml", "systemd", gateway=False)
    assert worker.units == ["appliance-store@gpu02", "appliance-standby@gpu02"]
    monkeypatch.setattr(services, "_answers", lambda url, settings: pytest.fail(url))
    monkeypatch.setattr(services, "listening", lambda path: True)
    worker.wait_healthy()


def test_a_standby_turned_off_is_stopped_and_disabled(tmp_path, monkeypatch):
    calls = []

    def systemctl(*args):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(services, "_systemctl", systemctl)
    monkeypatch.setattr(ServiceManager, "wait_healthy", lambda self: None)
    manager = ServiceManager(_settings(tmp_path, STANDBY_OFF), tmp_path / "config.yaml", "systemd")
    manager.start(restart=True)
    assert ("restart", "appliance-gateway") in calls
    assert ("disable", "--now", "appliance-standby@n1") in calls
    assert not [c for c in calls if c[0] in ("enable", "restart") and "standby" in c[-1]]
    calls.clear()
    manager.stop()
    assert calls[:2] == [("stop", "appliance-webapp"), ("stop", "appliance-gateway")]
    assert ("stop", "appliance-standby@n2") in calls


def test_the_services_wait_for_each_standby(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "_answers", lambda url, settings: True)
    monkeypatch.setattr(services, "HEALTH_TIMEOUT_S", 0)
    manager = ServiceManager(_settings(tmp_path, STANDBY_ON), tmp_path / "config.yaml", "systemd")
    with pytest.raises(
        ApplianceError, match=r"standby of node n1 .* `journalctl -u appliance-standby@n1`"
    ):
        manager.wait_healthy()
    monkeypatch.setattr(services, "listening", lambda path: path.name == "standby-n1.sock")
    with pytest.raises(ApplianceError, match="standby of node n2"):
        manager.wait_healthy()
    monkeypatch.setattr(services, "listening", lambda path: True)
    manager.wait_healthy()


def test_the_supervisor_runs_each_standby(tmp_path):
    config = tmp_path / "config.yaml"
    on = Supervisor(_settings(tmp_path, STANDBY_ON), config)
    names = [child.name for child in on.children]
    assert names == ["store-n1", "store-n2", "standby-n1", "standby-n2", "gateway", "webapp"]
    assert on.children[1].argv[-4:] == ["store", "serve", "--node", "n2"]
    assert on.children[1].log_file.name == "store-n2.log"
    assert on.children[3].argv[-4:] == ["standby", "serve", "--node", "n2"]
    assert on.children[3].log_file.name == "standby-n2.log"
    off = Supervisor(_settings(tmp_path, STANDBY_OFF), config)
    assert [child.name for child in off.children] == ["store-n1", "store-n2", "gateway", "webapp"]
    cpu = Supervisor(_settings(tmp_path), config)
    assert [child.name for child in cpu.children] == ["gateway", "webapp"]


def test_the_standby_drops_to_the_account_the_instance_jobs_run_as(tmp_path, monkeypatch):
    done = []
    monkeypatch.setattr(privileges, "run_as_service_user", lambda s: done.append("dropped"))
    monkeypatch.setattr(standby, "serve", lambda path, keep_s: done.append(path))
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nsecurity:\n  service_user: svc\n")
    result = CliRunner().invoke(
        standby_group, ["serve", "--node", "n7"], obj=CliContext(config_file=config)
    )
    assert result.exit_code == 0, result.output
    assert done == ["dropped", tmp_path / "state" / "run" / "standby-n7.sock"]


@pytest.mark.parametrize(("mode", "host"), [("local", "127.0.0.1"), ("existing", "0.0.0.0")])
def test_the_store_service_drops_to_the_account_the_loaders_run_as(
    tmp_path, monkeypatch, mode, host
):
    done = []
    monkeypatch.setattr(privileges, "run_as_service_user", lambda s: done.append("dropped"))
    monkeypatch.setattr("appliance.store.node_service.create_app", lambda s, node: node)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: done.append((app, kw)))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\ncluster:\n  mode: {mode}\n"
        "security:\n  service_user: svc\nserving:\n  tls: false\n"
    )
    result = CliRunner().invoke(
        store_group, ["serve", "--node", "n7"], obj=CliContext(config_file=config)
    )
    assert result.exit_code == 0, result.output
    # A local cluster's service answers the gateway on the loopback alone.
    assert done == ["dropped", ("n7", {"host": host, "port": 8101, "log_level": "warning"})]


def test_uninstall_disables_every_node_service_and_removes_its_socket(tmp_path, monkeypatch):
    settings = _settings(tmp_path, STANDBY_OFF)
    Manifest(prefix=str(tmp_path / "root"), service_mode="systemd").save(
        tmp_path / "install-manifest.json"
    )
    socket = settings.standby_socket("n2")
    socket.parent.mkdir(parents=True)
    socket.touch()  # left by a standby that was killed
    store_socket = settings.layout.store_socket("n2")
    store_socket.touch()
    ran = []
    monkeypatch.setattr(uninstaller.subprocess, "run", lambda argv, **kw: ran.append(argv))
    manager = ServiceManager(settings, tmp_path / "config.yaml", "systemd")
    monkeypatch.setattr(manager, "stop", lambda: True)
    list(uninstaller.uninstall(settings, manager, purge=False, keep_packages=True))
    assert ["systemctl", "disable", "appliance-standby@n1"] in ran
    assert ["systemctl", "disable", "appliance-standby@n2"] in ran
    assert ["systemctl", "disable", "appliance-store@n2"] in ran
    assert not store_socket.exists()
    assert not socket.exists() and (tmp_path / "state").is_dir()  # user data stays


def test_the_self_test_reports_the_standby(tmp_path):
    settings = _settings(tmp_path, "serving:\n  standby: true\n  standby_nodes: [n1]\n")
    with pytest.raises(AssertionError, match=r"not listening: n1 \(.*standby-n1.sock\)"):
        selftest._standby(settings, "tiny-chat")
    path = settings.standby_socket("n1")
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(4)
        assert selftest._standby(settings, "tiny-chat") == "listening for n1"
        settings.log_dir.mkdir(parents=True)
        old = settings.log_dir / "instance-tiny-chat-7.log"
        old.write_text("appliance: starting tiny-chat on cuda\n")
        assert selftest._standby(settings, "tiny-chat").endswith(f"started without it (see {old})")
        new = settings.log_dir / "instance-tiny-chat-8.log"
        new.write_text(f"appliance: {STARTED_BY_STANDBY} on {path}\n")
        os.utime(old, (1, 1))
        assert selftest._standby(settings, "tiny-chat").endswith("instance started through it")
