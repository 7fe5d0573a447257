"""`appliance standby`: the node's warm standby that starts vLLM instances without Python's start
and imports (appliance.serving.standby)."""

from __future__ import annotations

import socket

import click

from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.table import echo_table


@click.group("standby")
def standby_group() -> None:
    """The warm standby of a node (serving.standby)."""


@standby_group.command("serve")
@click.option("--node", default=None, help="This node's Slurm name (default: the host's name).")
@pass_ctx
def serve(ctx: CliContext, node: str | None) -> None:
    """Keep vLLM imported and fork a server for each instance job on this node, until stopped."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.layout import run_privately
    from appliance.security.privileges import run_as_service_user
    from appliance.serving.standby import serve as run

    settings = ctx.settings
    # The instance jobs run as the account the gateway runs as, and the standby serves only
    # its own account (SO_PEERCRED): it drops to the same one.
    run_as_service_user(settings)
    run_privately(settings.layout)
    node = node or socket.gethostname().split(".")[0]
    run(settings.standby_socket(node), keep_s=settings.serving.keep_engine_s)


def _nodes(ctx: CliContext, node: str | None) -> list[str]:
    """The nodes asked: `node`, else this host's standby nodes, else the host's own name."""
    if node:
        return [node]
    return list(ctx.settings.serving.standby_nodes) or [socket.gethostname().split(".")[0]]


@standby_group.command("engines")
@click.option("--node", default=None, help="One node (default: this host's standby nodes).")
@pass_ctx
def engines(ctx: CliContext, node: str | None) -> None:
    """The servers a standby keeps (serving.keep_engines): busy with a job, or idle and when
    they are dropped."""
    from appliance.serving.standby import ask  # when the command runs: a light start

    rows: list[tuple[object, ...]] = [("node", "pid", "model", "GPUs", "state")]
    for name in _nodes(ctx, node):
        answer = ask(ctx.settings.standby_socket(name), {"engines": True}, timeout=10)
        if answer is None:
            click.echo(f"node {name}: no standby answers", err=True)
            continue
        for e in answer.get("engines", []):
            state = (
                "busy"
                if e["idle_s"] is None
                else f"idle {e['idle_s']:.0f} s, dropped in {e['dropped_in_s']:.0f} s"
            )
            rows.append((name, e["pid"], e["model"] or "-", ",".join(e["gpus"]) or "-", state))
    if len(rows) > 1:
        echo_table(rows)
    else:
        click.echo("no kept engines")


@standby_group.command("drop")
@click.option("--node", default=None, help="One node (default: this host's standby nodes).")
@click.option("--gpus", default=None, help="Only those on these GPUs (Slurm's numbers, e.g. 0,1).")
@pass_ctx
def drop(ctx: CliContext, node: str | None, gpus: str | None) -> None:
    """End the idle kept engines (all, or those on `--gpus`) now, freeing their GPU memory;
    busy ones stay with their jobs."""
    from appliance.serving.standby import drop_idle_engines  # when the command runs

    wanted = None if gpus is None else [g for g in gpus.split(",") if g]
    for name in _nodes(ctx, node):
        dropped = drop_idle_engines(ctx.settings.standby_socket(name), wanted)
        if dropped is None:
            click.echo(f"node {name}: no standby answers", err=True)
        else:
            click.echo(f"node {name}: {dropped} idle kept engine(s) dropped")


COMMANDS = [standby_group]
