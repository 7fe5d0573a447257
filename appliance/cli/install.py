"""`appliance install | uninstall | services | supervise`: the installed appliance's life cycle
(installer/ does the work; see docs/installer.md)."""

from __future__ import annotations

import click

from appliance.cli.context import CliContext, pass_ctx
from appliance.errors import ApplianceError


@click.command(
    "install", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def install(args: tuple[str, ...]) -> int:
    """Install (or bring up to date) the appliance on this machine; `--help` lists the options
    of installer/install.sh, which this runs."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.installer.cli import install as run_install

    return run_install(list(args))


def _manager(ctx: CliContext):
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.installer.manifest import Manifest
    from appliance.services import ServiceManager

    settings = ctx.settings
    config = settings.config_file
    if config is None:
        raise ApplianceError("no configuration file: this machine was not set up by the installer")
    manifest = Manifest.load(config.parent / "install-manifest.json")
    if not manifest.service_mode:
        raise ApplianceError(
            f"{config.parent} has no install manifest: use `appliance up`/`down` for a "
            "development stack, or run installer/install.sh"
        )
    return ServiceManager(
        settings, config, manifest.service_mode, gateway=manifest.profile != "worker"
    )


@click.group("services")
def services_group() -> None:
    """The installed services (systemd units, or the supervisor where systemd does not run)."""


@services_group.command("start")
@pass_ctx
def services_start(ctx: CliContext) -> None:
    """Start the services that are not running and wait until they answer."""
    manager = _manager(ctx)
    manager.start()
    click.echo(f"running: {manager.describe()}")


@services_group.command("stop")
@pass_ctx
def services_stop(ctx: CliContext) -> None:
    """Stop the web app, the gateway, its instances and the local Slurm cluster."""
    _manager(ctx).stop()
    click.echo("stopped")


@services_group.command("restart")
@pass_ctx
def services_restart(ctx: CliContext) -> None:
    """Restart every service (after a configuration change)."""
    manager = _manager(ctx)
    manager.start(restart=True)
    click.echo(f"running: {manager.describe()}")


@services_group.command("status")
@pass_ctx
def services_status(ctx: CliContext) -> int:
    """Whether the services run (exit status 3 when they do not)."""
    manager = _manager(ctx)
    running = manager.running()
    click.echo(("running: " if running else "not running: ") + manager.describe())
    return 0 if running else 3


@click.command("supervise")
@pass_ctx
def supervise(ctx: CliContext) -> None:
    """Run the services in the foreground and restart them when they die (the installer's
    service mode where systemd does not run)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.supervisor import Supervisor

    config = ctx.settings.config_file
    if config is None:
        raise ApplianceError("supervise needs a configuration file (--config)")
    Supervisor(ctx.settings, config).run()


@click.command("uninstall")
@click.option(
    "--purge",
    is_flag=True,
    help="Also delete user data: models, keys, knowledge "
    "bases, audit log, logs (asks first unless --yes).",
)
@click.option("--keep-packages", is_flag=True, help="Keep the Debian packages it installed.")
@click.option("--yes", is_flag=True, help="Do not ask before --purge deletes data.")
@pass_ctx
def uninstall(ctx: CliContext, purge: bool, keep_packages: bool, yes: bool) -> None:
    """Remove what the installer installed; user data stays unless --purge."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.installer.uninstall import uninstall as run_uninstall

    if purge and not yes:
        click.confirm(f"delete all data in {ctx.settings.state_dir}?", abort=True)
    for line in run_uninstall(
        ctx.settings, _manager(ctx), purge=purge, keep_packages=keep_packages
    ):
        click.echo(line)


COMMANDS = [install, services_group, supervise, uninstall]
