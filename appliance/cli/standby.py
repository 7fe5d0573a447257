"""`appliance standby`: the node's warm standby that starts vLLM instances without Python's start
and imports (appliance.serving.standby)."""

from __future__ import annotations

import socket

import click

from appliance.cli.context import CliContext, pass_ctx


@click.group("standby")
def standby_group() -> None:
    """The warm standby of a node (serving.standby)."""


@standby_group.command("serve")
@click.option("--node", default=None, help="This node's Slurm name (default: the host's name).")
@pass_ctx
def serve(ctx: CliContext, node: str | None) -> None:
    """Keep vLLM imported and fork a server for each instance job on this node, until stopped."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.serving.standby import serve as run

    run(ctx.settings.standby_socket(node or socket.gethostname().split(".")[0]))


COMMANDS = [standby_group]
