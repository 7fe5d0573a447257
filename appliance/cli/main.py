"""Entry point of the `appliance` command."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from appliance import __version__
from appliance.cli.context import CliContext
from appliance.errors import ApplianceError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML configuration file (default: $APPLIANCE_CONFIG, then /etc/appliance/config.yaml).",
)
@click.version_option(__version__, prog_name="appliance")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None) -> None:
    """Run LLMs privately on your own servers.

    \b
    Typical first steps on a new machine:
      appliance cluster up          start a local Slurm cluster
      appliance models build-tiny   build the small offline test model
      appliance up                  start everything (cluster, gateway) and print the URLs
    Then point any OpenAI client at the printed base URL.
    """
    ctx.obj = CliContext(config_file=config_file)
    ctx.call_on_close(ctx.obj.close)


# Subcommand modules, imported when the CLI runs rather than at the top, so each stays independent.
_COMMAND_MODULES = (
    "audit",
    "backup",
    "breaker",
    "cluster",
    "config_cmd",
    "data",
    "gateway",
    "health",
    "install",
    "instances",
    "kb",
    "keys",
    "models",
    "stack",
    "standby",
    "store",
    "train",
    "upgrade",
    "users",
    "webapp",
)


def _register() -> None:
    for name in _COMMAND_MODULES:
        for command in importlib.import_module(f"appliance.cli.{name}").COMMANDS:
            cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; operator errors are printed as one clear message, never a traceback."""
    _register()
    try:
        result = cli.main(args=argv, prog_name="appliance", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    # Without standalone mode click returns ctx.exit()'s code (or the command's return value).
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
