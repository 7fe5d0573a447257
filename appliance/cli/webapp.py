"""`appliance webapp`: run the web app in the foreground."""

from __future__ import annotations

import logging

import click

from appliance.cli.context import CliContext, pass_ctx


@click.command("webapp")
@click.option("--host", default=None, help="Override webapp.host for this run.")
@click.option("--port", type=int, default=None, help="Override webapp.port for this run.")
@pass_ctx
def webapp(ctx: CliContext, host: str | None, port: int | None) -> None:
    """Run the web app (chat, knowledge bases, models) in the foreground; it talks to the
    gateway's API (`appliance up` runs both in the background)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.webapp.server import run_webapp

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.cli.data import open_for_service
    from appliance.layout import run_privately
    from appliance.security.privileges import run_as_service_user
    from appliance.state_version import require_current

    run_as_service_user(ctx.settings)
    # Before anything reads user content: the data volume opens under its policy, or the
    # service does not start, saying why.
    open_for_service(ctx.settings)
    run_privately(ctx.settings.layout, ctx.settings.rag_dir)
    require_current(ctx.settings.state_dir)  # as the gateway: only a state of this schema
    run_webapp(ctx.settings, host, port)


COMMANDS = [webapp]
