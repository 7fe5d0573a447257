"""`appliance config`: show and check the effective configuration."""

from __future__ import annotations

import click
import yaml

from appliance.cli.context import CliContext, pass_ctx


@click.group("config")
def config_group() -> None:
    """Show or check the configuration (YAML file + APPLIANCE_* variables)."""


@config_group.command("show")
@pass_ctx
def show(ctx: CliContext) -> None:
    """Print the effective configuration as YAML."""
    data = ctx.settings.model_dump(mode="json")
    click.echo(yaml.safe_dump(data, sort_keys=False))


@config_group.command("check")
@pass_ctx
def check(ctx: CliContext) -> None:
    """Validate the configuration and say where it came from."""
    settings = ctx.settings
    source = settings._config_file or "defaults and environment only"
    click.echo(f"configuration is valid (file: {source})")


@config_group.command("docs")
def docs() -> None:
    """Print the reference of every setting as Markdown (docs/configuration.md)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.config.reference import render_reference

    click.echo(render_reference(), nl=False)


COMMANDS = [config_group]
