"""`appliance cluster` commands that need no running Slurm: help, options, status of nothing."""

from __future__ import annotations

from click.testing import CliRunner

from appliance.cli.cluster import cluster_group
from appliance.cli.context import CliContext


def invoke(tmp_path, *args: str):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "cluster: {name: clitest, controller_port: 29817, node_port_base: 29818}\n"
    )
    return CliRunner().invoke(cluster_group, list(args), obj=CliContext(config_file=config))


def test_status_of_a_cluster_that_was_never_started(tmp_path):
    result = invoke(tmp_path, "status")
    assert result.exit_code == 1
    assert "cluster clitest (local)" in result.output
    assert "slurmctld  stopped" in result.output
    assert "not set up yet: run `appliance cluster up`" in result.output


def test_down_of_a_cluster_that_is_not_running_is_fine(tmp_path):
    result = invoke(tmp_path, "down")
    assert result.exit_code == 0 and "stopped" in result.output


def test_up_rejects_out_of_range_overrides(tmp_path):
    result = invoke(tmp_path, "up", "--nodes", "0")
    assert result.exit_code == 2 and "--nodes" in result.output


def test_help_explains_the_commands(tmp_path):
    result = invoke(tmp_path, "--help")
    assert result.exit_code == 0
    for word in ("up", "down", "status", "slurmctld", "<state_dir>/slurm"):
        assert word in result.output
