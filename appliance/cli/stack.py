"""`appliance up|down|status`: the whole stack (local Slurm, tiny model, gateway, web app) in one
go."""

from __future__ import annotations

import sys
import time

import click
import httpx

from appliance.cli.api import GatewayUnreachable, gateway_call
from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.data import describe
from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError


def _wait_healthy(url: str, timeout: float, settings: ApplianceSettings) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            verify = settings.tls_verify
            if httpx.get(url + "/health", timeout=2, verify=verify).status_code == 200:
                return True
        except (httpx.HTTPError, FileNotFoundError):  # not up, or no certificate made yet
            pass
        time.sleep(0.3)
    return False


@click.command("up")
@click.option("--no-tiny", is_flag=True, help="Do not build the tiny model if it is missing.")
@pass_ctx
def up(ctx: CliContext, no_tiny: bool) -> None:
    """Start everything: local Slurm cluster, tiny model (built once), gateway, web app. Safe to
    repeat."""
    settings = ctx.settings
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.state_version import require_current

    # Said now, not after the gateway failed to come up: an older state needs `appliance upgrade`.
    require_current(settings.state_dir)
    if settings.security.data_at_rest.enabled:
        # Imported when the command runs: `appliance` starts without loading the stack.
        from appliance.security.data_volume import openable

        openable(settings)  # a data policy that refuses is said now, before anything starts
    if settings.cluster.mode == "local":
        # Imported when the command runs: `appliance` starts without loading the stack.
        from appliance.slurm.local_cluster import LocalCluster

        click.echo("starting the local Slurm cluster ...")
        status = LocalCluster(settings).up()
        click.echo(status.render())
    if not no_tiny:
        # Imported when the command runs: `appliance` starts without loading the stack.
        from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists

        tiny_dir = settings.models_dir / "tiny-chat"
        if not tiny_model_exists(tiny_dir):
            click.echo("building the tiny chat model (once, about 3 minutes) ...")
            report = build_tiny_model(tiny_dir, progress=click.echo)
            click.echo(f"tiny model: {report.summary()}")
    url = settings.gateway_url
    _start_service(ctx, "gateway", url)
    web_url = None
    if settings.webapp.enabled:
        host = settings.webapp.host
        web_url = (
            f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{settings.webapp.port}"
        )
        _start_service(ctx, "webapp", web_url)
    click.echo(f"\ngateway:     {url}  (log: {settings.log_dir / 'gateway.log'})")
    click.echo(f"OpenAI API:  {url}/v1   e.g. curl {url}/v1/models")
    if web_url:
        click.echo(f"web app:     {web_url}  (log: {settings.log_dir / 'webapp.log'})")
    click.echo(
        "models start on the first request (scale from zero); `appliance instances list` shows them"
    )


def _start_service(ctx: CliContext, command: str, url: str) -> None:
    """Start `appliance <command>` in the background unless it runs; wait for its /health."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.daemon import read_pid, start_detached, tail

    settings = ctx.settings
    pidfile = settings.state_dir / f"{command}.pid"
    log_file = settings.log_dir / f"{command}.log"
    if read_pid(pidfile) is None:
        argv = [sys.executable, "-m", "appliance.cli.main"]
        if ctx.config_file:
            argv += ["--config", str(ctx.config_file)]
        start_detached([*argv, command], log_file, pidfile)
    if not _wait_healthy(url, 90, settings):
        raise ApplianceError(
            f"the {command} did not come up; last lines of {log_file}:\n" + tail(log_file)
        )


@click.command("down")
@click.option("--keep-cluster", is_flag=True, help="Stop the gateway and instances only.")
@pass_ctx
def down(ctx: CliContext, keep_cluster: bool) -> None:
    """Stop the web app, the gateway, its model instances and (unless --keep-cluster) the local
    cluster."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.daemon import stop_pid

    settings = ctx.settings
    for service in ("webapp", "gateway"):
        if stop_pid(settings.state_dir / f"{service}.pid"):
            click.echo(f"{service} stopped")
    if settings.cluster.mode == "local" and not keep_cluster:
        # Imported when the command runs: `appliance` starts without loading the stack.
        from appliance.slurm.local_cluster import LocalCluster

        LocalCluster(settings).down()
        click.echo("local Slurm cluster stopped")
    if settings.security.data_at_rest.enabled:
        # Last: the cluster's jobs (instances, fine-tuning) read from it until they stop.
        # Imported when the command runs: `appliance` starts without loading the stack.
        from appliance.security.data_volume import close_volume

        if close_volume(settings):
            click.echo("data volume closed: the user data is sealed")


@click.command("status")
@pass_ctx
def status(ctx: CliContext) -> None:
    """Show the cluster, the gateway and the models' states."""
    settings = ctx.settings
    if settings.cluster.mode == "local":
        # Imported when the command runs: `appliance` starts without loading the stack.
        from appliance.slurm.local_cluster import LocalCluster

        click.echo(LocalCluster(settings).status().render())
    click.echo(describe(settings))
    url = settings.gateway_url
    try:
        # With keys on the gateway, this needs one (APPLIANCE_API_KEY): gateway_call says so.
        models = gateway_call(ctx, "GET", "/v1/models", timeout=5)["data"]
    except GatewayUnreachable:
        click.echo(f"gateway: not answering at {url}")
        return
    click.echo(f"gateway: {url}")
    for m in models:
        flag = "" if m["installed"] else " (not installed)"
        click.echo(f"  {m['id']:<28} {m['state']:<9} instances={m['instances']}{flag}")


COMMANDS = [up, down, status]
