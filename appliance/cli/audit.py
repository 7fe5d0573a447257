"""`appliance audit`: verify and read the tamper-evident audit log."""

from __future__ import annotations

import getpass
import json

import click

from appliance.cli.context import CliContext, pass_ctx


def cli_actor() -> str:
    """Who the audit log names for something done with the CLI."""
    return f"cli:{getpass.getuser()}"


def record(ctx: CliContext, action: str, target: str = "", **detail) -> None:
    """Append an entry for a CLI action (used by the commands that change users, keys, policies)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.audit import AuditLog

    AuditLog(ctx.settings.audit_dir).append(cli_actor(), action, target, **detail)


@click.group("audit")
def audit_group() -> None:
    """The audit log: sign-ins, keys, models started and stopped, uploads, deletions, changes."""


@audit_group.command("verify")
@pass_ctx
def verify(ctx: CliContext) -> None:
    """Check every entry and the chain; exit status 1 names the first altered, removed,
    inserted or reordered entry."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.audit import AuditLog

    result = AuditLog(ctx.settings.audit_dir).verify()
    if result.ok:
        click.echo(f"audit log intact: {result.entries} entries")
        return
    click.echo(f"audit log TAMPERED at line {result.line}: {result.problem}", err=True)
    raise SystemExit(1)


@audit_group.command("show")
@click.option("-n", "--lines", default=20, show_default=True, help="How many of the last entries.")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON lines.")
@pass_ctx
def show(ctx: CliContext, lines: int, as_json: bool) -> None:
    """Print the last entries."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.audit import AuditLog

    for entry in AuditLog(ctx.settings.audit_dir).entries()[-lines:]:
        if as_json:
            click.echo(json.dumps(entry))
        else:
            detail = " ".join(f"{k}={v}" for k, v in entry["detail"].items())
            click.echo(
                f"{entry['seq']:>6} {entry['time']} {entry['actor']:<16} {entry['action']:<16} "
                f"{entry['target']} {detail}".rstrip()
            )


COMMANDS = [audit_group]
