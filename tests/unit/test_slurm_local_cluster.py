"""LocalCluster checks that need no daemons, and the status report built from captured nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ApplianceSettings
from appliance.config.cluster import ClusterSettings
from appliance.errors import ApplianceError
from appliance.slurm import local_cluster
from appliance.slurm.client import SlurmClient
from appliance.slurm.install import slurmstepd_beside
from appliance.slurm.local_cluster import ClusterStatus, DaemonStatus, LocalCluster, node_ready
from tests.unit.slurm_replay import ReplayRunner


def test_a_state_dir_too_long_for_slurm_sockets_is_refused_before_anything_starts(tmp_path):
    state = tmp_path / ("d" * 90)
    settings = ApplianceSettings(state_dir=state, cluster=ClusterSettings(controller_port=29900))
    with pytest.raises(ApplianceError, match="too long for Slurm"):
        LocalCluster(settings, runner=ReplayRunner()).up()  # fails before running anything
    assert not (state / "slurm" / "slurm.conf").exists()


@pytest.mark.parametrize("action", ["up", "down"])
def test_an_existing_cluster_is_not_started_or_stopped_by_the_stack(tmp_path, action):
    settings = ApplianceSettings(
        state_dir=tmp_path, cluster=ClusterSettings(mode="existing", slurm_conf=Path("/x.conf"))
    )
    with pytest.raises(ApplianceError, match=r"cluster\.mode is 'existing'"):
        getattr(LocalCluster(settings, runner=ReplayRunner()), action)()


def test_node_readiness_and_the_status_report():
    nodes = SlurmClient(ReplayRunner().replay("sinfo_drained")).nodes()
    assert [node_ready(n) for n in nodes] == [True, False]  # allocated is ready; drained is not
    status = ClusterStatus(
        name="lab",
        mode="local",
        slurm_conf=Path("/s/slurm.conf"),
        daemons=[DaemonStatus("slurmctld", 10, 16817, Path("/s/log/slurmctld.log"))],
        controller_reachable=True,
        nodes=nodes,
    )
    assert not status.running
    text = status.render()
    assert "slurmctld  running  10" in text
    assert "n2    mixed+drain" in text and "captured drain" in text
    assert "controller: reachable" in text


def _unpacked_slurm(root: Path) -> Path:
    """A Debian-style sbin folder as `dpkg -x` and slurm_unpack.sh leave it; returns it."""
    sbin = root / "usr" / "sbin"
    sbin.mkdir(parents=True)
    for name in ("slurmd", "slurmstepd"):
        (sbin / f"{name}-wlm").write_text("#!/bin/sh\n")
        (sbin / f"{name}-wlm").chmod(0o755)
        (sbin / name).symlink_to(f"{name}-wlm")
    return sbin


def test_slurmd_is_given_the_slurmstepd_installed_beside_it(tmp_path, monkeypatch):
    sbin = _unpacked_slurm(tmp_path / "prefix")
    monkeypatch.setattr(local_cluster, "find_program", lambda name: str(sbin / name))
    settings = ApplianceSettings(state_dir=tmp_path / "state")
    argv = LocalCluster(settings, runner=ReplayRunner())._daemon_argv("slurmd", "n1")
    assert argv[argv.index("-d") + 1] == str(sbin / "slurmstepd")
    assert argv[-2:] == ["-f", str((tmp_path / "state" / "slurm" / "slurm.conf").absolute())]


def test_slurmstepd_is_looked_for_beside_slurmd_and_beside_what_it_links_to(tmp_path):
    sbin = _unpacked_slurm(tmp_path / "prefix")
    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    (elsewhere / "slurmd").symlink_to(sbin / "slurmd-wlm")
    assert slurmstepd_beside(str(elsewhere / "slurmd")) == str(sbin / "slurmstepd")
    (elsewhere / "lonely-slurmd").write_text("")
    assert slurmstepd_beside(str(elsewhere / "lonely-slurmd")) is None
