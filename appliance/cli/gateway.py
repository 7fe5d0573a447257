"""`appliance gateway`: run the OpenAI-compatible gateway in the foreground."""

from __future__ import annotations

import logging

import click

from appliance.cli.context import CliContext, pass_ctx


@click.command("gateway")
@click.option("--host", default=None, help="Override gateway.host for this run.")
@click.option("--port", type=int, default=None, help="Override gateway.port for this run.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@pass_ctx
def gateway(ctx: CliContext, host: str | None, port: int | None, log_level: str) -> None:
    """Run the gateway in the foreground (`appliance up` runs it in the background)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    import uvicorn

    from appliance.gateway.app import create_app

    settings = ctx.settings
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every health probe at INFO; keep the gateway's log about the gateway.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.cli.data import open_for_service
    from appliance.layout import run_privately
    from appliance.security.privileges import run_as_service_user
    from appliance.state_version import require_current

    run_as_service_user(settings)
    # Before anything reads user content: the data volume opens under its policy, or the
    # service does not start, saying why.
    open_for_service(settings)
    run_privately(settings.layout, settings.rag_dir)
    # Never run on a state of another schema: a newer one is left alone, an older one migrated
    # by `appliance upgrade` first; a fresh one gets this release's version.
    require_current(settings.state_dir)
    app = create_app(settings)
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.tls import server_options

    uvicorn.run(
        app,
        **server_options(settings.gateway.tls, *settings.tls_files),
        host=host or settings.gateway.host,
        port=port or settings.gateway.port,
        log_level=log_level,
        # Never with the user content encrypted at rest: request paths name knowledge bases,
        # documents (a deletion's file name) and conversations, and the log is plaintext.
        access_log=log_level == "debug" and not settings.security.data_at_rest.enabled,
        # X-Forwarded-For is believed from the configured proxies only (uvicorn's default
        # trusts any local process, which could then choose the client the audit log names).
        proxy_headers=bool(settings.gateway.trusted_proxies),
        forwarded_allow_ips=settings.gateway.trusted_proxies or None,
        timeout_graceful_shutdown=10,
    )


COMMANDS = [gateway]
