"""Start, stop and report an installed appliance's services: systemd units where systemd runs,
otherwise the `appliance supervise` process (pid file in the state directory)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx

from appliance.config import ApplianceSettings
from appliance.daemon import listening, read_pid, start_detached, stop_pid, tail
from appliance.errors import ApplianceError
from appliance.security.data_volume import DataSealed, close_volume, openable

HEALTH_TIMEOUT_S = 240


class ServiceManager:
    """The installed services of one configuration, in the installer's service mode."""

    def __init__(
        self, settings: ApplianceSettings, config_file: Path, mode: str, gateway: bool = True
    ):
        self.settings = settings
        self.config_file = config_file
        self.mode = mode
        # The gateway and the web app run here (not on a multi-node cluster's worker).
        self.gateway = gateway
        self.pidfile = settings.layout.supervisor_pid
        self.log_file = settings.log_dir / "supervisor.log"

    @property
    def standby_nodes(self) -> list[str]:
        """This host's nodes whose warm standby runs (serving.standby_nodes, while
        serving.standby is on)."""
        serving = self.settings.serving
        return list(serving.standby_nodes) if serving.standby else []

    @property
    def units(self) -> list[str]:
        """The units that run, in the order they start."""
        return self._units(self.standby_nodes)

    @property
    def installed_units(self) -> list[str]:
        """Every unit of the installation: also the standbys of a host where serving.standby
        was turned off."""
        return self._units(self.settings.serving.standby_nodes)

    def _units(self, standby_nodes: list[str]) -> list[str]:
        units = ["appliance-cluster"] if self.settings.cluster.mode == "local" else []
        # Every GPU node of this host runs its store service, standby or not: the gateway places
        # instances by what it holds, and its host tier feeds the node's loaders.
        units += [store_unit(node) for node in self.settings.serving.standby_nodes]
        units += [standby_unit(node) for node in standby_nodes]
        return [*units, "appliance-gateway", "appliance-webapp"] if self.gateway else units

    def running(self) -> bool:
        if self.mode == "systemd":
            return all(_systemctl("is-active", "--quiet", u).returncode == 0 for u in self.units)

        return read_pid(self.pidfile) is not None

    def start(self, restart: bool = False) -> bool:
        """Start what is not running (everything, with `restart`); wait until the gateway and
        the web app answer. True when something was (re)started."""
        acted = not self.running() or restart
        if self.gateway and self.settings.security.data_at_rest.enabled:
            openable(self.settings)  # a policy that refuses is said now, not after 240 s
        if self.mode == "systemd":
            _systemctl("daemon-reload")
            verb = "restart" if restart else "start"
            for unit in self.units:
                _systemctl("enable", unit)
                done = _systemctl(verb, unit)
                if done.returncode:
                    raise ApplianceError(f"systemctl {verb} {unit} failed: {done.stderr.strip()}")
            for unit in self.installed_units:
                if unit not in self.units:  # a standby, since serving.standby was turned off
                    _systemctl("disable", "--now", unit)
        elif acted:
            self.stop()
            argv = [
                sys.executable,
                "-m",
                "appliance.cli.main",
                "--config",
                str(self.config_file),
                "supervise",
            ]
            # A daemon holds no working directory (and must not import from a checkout there).
            start_detached(argv, self.log_file, self.pidfile, cwd=Path("/"))
        self.wait_healthy()
        return acted

    def stop(self) -> bool:
        if self.mode == "systemd":
            for unit in reversed(self.installed_units):
                _systemctl("stop", unit)
            stopped = True
        else:
            stopped = stop_pid(self.pidfile, timeout=120)
        # With the services gone, nothing holds the data volume open (the supervisor closes it
        # as it stops; systemd's units leave it to this). A job of an existing cluster may
        # still read from it: then it stays open, and the services find it so when they start.
        if self.gateway and self.settings.security.data_at_rest.enabled:
            with contextlib.suppress(DataSealed):
                close_volume(self.settings)
        return stopped

    def wait_healthy(self) -> None:
        """Until the gateway and the web app answer and every warm standby listens (a job that
        starts before its node's standby is ready starts its server the slow way)."""
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        waits = [("appliance-gateway", self.settings.gateway_url)] if self.gateway else []
        if self.gateway and self.settings.webapp.enabled:
            waits.append(("appliance-webapp", self.settings.webapp_url))
        for unit, url in waits:
            self._wait(url, unit, lambda url=url: _answers(url, self.settings), deadline)
        for node in self.standby_nodes:
            path = self.settings.standby_socket(node)
            what = f"the warm standby of node {node} ({path})"
            self._wait(what, standby_unit(node), lambda path=path: listening(path), deadline)

    def _wait(self, what: str, unit: str, ready, deadline: float) -> None:
        while not ready():
            if time.monotonic() > deadline:
                where = (
                    f"`journalctl -u {unit}`"
                    if self.mode == "systemd"
                    else f"the logs in {self.settings.log_dir}"
                )
                raise ApplianceError(
                    f"{what} did not answer within {HEALTH_TIMEOUT_S} s; see {where}"
                )
            if self.mode == "supervisor" and not self.running():
                raise ApplianceError(
                    f"the supervisor exited; last lines of {self.log_file}:\n" + tail(self.log_file)
                )
            time.sleep(1)

    def describe(self) -> str:
        if self.mode == "systemd":
            return "systemd units " + ", ".join(self.units)

        pid = read_pid(self.pidfile)
        return f"`appliance supervise` (pid {pid}, log {self.log_file})" if pid else "stopped"


def standby_unit(node: str) -> str:
    """The systemd unit of a node's warm standby (an instance of appliance-standby@.service)."""
    return f"appliance-standby@{node}"


def store_unit(node: str) -> str:
    """The systemd unit of a node's store service (an instance of appliance-store@.service)."""
    return f"appliance-store@{node}"


def _answers(url: str, settings: ApplianceSettings) -> bool:
    try:
        return httpx.get(url + "/health", timeout=3, verify=settings.tls_verify).is_success
    except (httpx.HTTPError, FileNotFoundError):
        return False


def _systemctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
