"""`appliance health-check`: the node health check (Slurm's HealthCheckProgram)."""

from __future__ import annotations

import socket

import click

from appliance import envs
from appliance.cli.context import CliContext, pass_ctx


@click.command("health-check")
@click.option("--node", default=None, help="Slurm node name (default: $SLURMD_NODENAME, host).")
@click.option(
    "--apply",
    "apply_",
    is_flag=True,
    help="Drain the node if a check fails, resume it when all pass (what Slurm runs).",
)
@pass_ctx
def health_check(ctx: CliContext, node: str | None, apply_: bool) -> None:
    """Check this node: scratch space, memory, CPUs, GPUs. Exit status 1 when a check fails."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.monitoring.health import apply, run_checks
    from appliance.slurm.client import SlurmClient
    from appliance.slurm.runner import LocalRunner

    settings = ctx.settings
    name = node or envs.SLURMD_NODENAME or socket.gethostname().split(".")[0]
    client = SlurmClient(LocalRunner(), settings.slurm_conf, timeout=20)
    record = next((n for n in client.nodes() if n.name == name), None)
    results = run_checks(settings, record, name)
    for r in results:
        click.echo(f"{'ok  ' if r.ok else 'FAIL'}  {r.name}: {r.detail}")
    if apply_:
        if record is None:
            raise click.ClickException(f"Slurm has no node {name}")
        click.echo(apply(client, record, results))
    if not all(r.ok for r in results):
        raise SystemExit(1)


COMMANDS = [health_check]
