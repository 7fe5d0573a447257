"""`appliance cluster`: start, stop and inspect the local Slurm cluster."""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError

from appliance.cli.context import CliContext, pass_ctx
from appliance.config import ApplianceSettings
from appliance.config.cluster import ClusterSettings
from appliance.errors import ApplianceError


@click.group("cluster")
def cluster_group() -> None:
    """The Slurm cluster that runs every model instance.

    \b
    In `local` mode (the default) the stack runs its own Slurm on this host: one controller
    (slurmctld) and one slurmd per node, with simulated GPUs when the host has none. Its
    configuration, state and logs live under <state_dir>/slurm.
    """


def _with_overrides(settings: ApplianceSettings, **changes: int | None) -> ApplianceSettings:
    """The settings with some cluster fields replaced, validated like the configuration file."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return settings
    try:
        cluster = ClusterSettings(**{**settings.cluster.model_dump(), **changes})
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise ApplianceError(f"invalid cluster option: {problems}") from None
    return settings.model_copy(update={"cluster": cluster})


@cluster_group.command("up")
@click.option(
    "--nodes",
    type=click.IntRange(1, 64),
    default=None,
    help="Number of slurmd nodes for this run only (default: cluster.nodes from the config).",
)
@click.option(
    "--gpus-per-node",
    type=click.IntRange(0, 16),
    default=None,
    help="Simulated GPUs per node for this run only (default: cluster.gpus_per_node).",
)
@pass_ctx
def up(ctx: CliContext, nodes: int | None, gpus_per_node: int | None) -> None:
    """Start the local Slurm cluster and wait until every node is idle.

    Installs Slurm (Debian's slurm-wlm) when it is missing, writes slurm.conf and gres.conf,
    starts the daemons and resumes nodes an earlier run left drained. Running it again is safe:
    daemons that run are kept, and restarted only if the configuration changed.
    """
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.slurm.local_cluster import LocalCluster

    settings = _with_overrides(ctx.settings, nodes=nodes, gpus_per_node=gpus_per_node)
    c = settings.cluster
    gpus = f", {c.gpus_per_node} simulated GPU(s) each" if c.gpus_per_node else ""
    click.echo(f"starting the local Slurm cluster {c.name!r}: {c.nodes} node(s){gpus} ...")
    status = LocalCluster(settings).up()
    click.echo(status.render())
    click.echo(f"\nUse Slurm's own tools with: export SLURM_CONF={settings.slurm_conf}")
    if nodes is not None or gpus_per_node is not None:
        click.echo(
            "note: --nodes/--gpus-per-node apply to this run only; the next `appliance cluster up` "
            "without them restarts the cluster in the configured shape."
        )


@cluster_group.command("down")
@pass_ctx
def down(ctx: CliContext) -> None:
    """Stop the local Slurm cluster.

    The stack's jobs (model instances) are cancelled first, then the daemons are stopped.
    Slurm's state (job history, drained nodes) is kept for the next `appliance cluster up`.
    """
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.slurm.local_cluster import LocalCluster

    LocalCluster(ctx.settings).down()
    click.echo("local Slurm cluster stopped")


@cluster_group.command("status")
@pass_ctx
def status(ctx: CliContext) -> None:
    """Show the daemons, the controller and the nodes (CPUs, memory, GPUs).

    Exits with status 1 when the cluster is not fully up (for scripts).
    """
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.slurm.local_cluster import LocalCluster

    result = LocalCluster(ctx.settings).status()
    click.echo(result.render())
    if not result.running:
        # sys.exit, not click's Exit: main() runs click with standalone_mode=False, which turns
        # Exit into a return value that main() does not pass on.
        sys.exit(1)


COMMANDS = [cluster_group]
