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


COMMANDS = [standby_group]
