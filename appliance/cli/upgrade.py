"""`appliance upgrade`: migrate the state directory to this release's schema, after a backup."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.audit import record
from appliance.cli.backup import PASSPHRASE, key_source
from appliance.cli.context import CliContext, pass_ctx


@click.command("upgrade")
@click.option("--dry-run", is_flag=True, help="List the pending steps; change nothing.")
@click.option(
    "--backup-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the backup taken first goes (default: <state_dir>/backups).",
)
@PASSPHRASE
@pass_ctx
def upgrade(
    ctx: CliContext, dry_run: bool, backup_dir: Path | None, passphrase_file: Path | None
) -> None:
    """Migrate the state directory in place to this release's schema. Stop the stack first
    (`appliance down`). A backup is taken first (sealed with the key-encryption key, or
    --passphrase-file); to roll back, `appliance restore` it with the previous release. Run as
    root, it runs as security.service_user, which must be able to write --backup-dir."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.privileges import run_as_service_user
    from appliance.state_version import SCHEMA_VERSION, state_version
    from appliance.upgrade.runner import pending_steps
    from appliance.upgrade.service import upgrade as run_upgrade

    settings = ctx.settings
    version = state_version(settings.state_dir)
    steps = pending_steps(settings)
    if dry_run:
        shown = "fresh (no data)" if version is None else str(version)
        click.echo(
            f"state directory {settings.state_dir}: schema {shown}, this release reads "
            f"{SCHEMA_VERSION}"
        )
        if not steps:
            click.echo("nothing to migrate")
        for step in steps:
            click.echo(f"step {step.source} -> {step.target}: {step.name}")
            for migration in step.migrations:
                click.echo(f"  {migration.format:<14} {migration.description}")
        return
    # As root: as the services' account, which must go on reading what the upgrade writes.
    run_as_service_user(settings)
    result = run_upgrade(
        settings,
        backup_dir or settings.layout.backups,
        lambda: key_source(ctx, passphrase_file),
        progress=click.echo,
    )
    if result.steps:
        record(
            ctx,
            "upgrade",
            str(settings.state_dir),
            from_version=result.source,
            to_version=result.target,
            backup=str(result.backup),
        )
        click.echo(f"upgraded {settings.state_dir} from schema {result.source} to {result.target}")
        click.echo(f"backup taken first: {result.backup} (roll back: `appliance restore` it)")
    else:
        click.echo(f"{settings.state_dir} is at schema {result.target}: nothing to migrate")


COMMANDS = [upgrade]
