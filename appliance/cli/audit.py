"""`appliance audit`: verify and read the tamper-evident audit log."""

from __future__ import annotations

import getpass
import json
import re
from typing import Any

import click

from appliance.cli.context import CliContext, pass_ctx

# Shown as they are; anything else is JSON-quoted, so that a name with spaces, '=' or a newline
# cannot pass for other fields or a line of its own.
_PLAIN = re.compile(r"[\w.@:/+,-]*")


def cli_actor() -> str:
    """Who the audit log names for something done with the CLI."""
    return f"cli:{getpass.getuser()}"


def shown(value: Any) -> str:
    """One field of an entry as text on one line, unambiguous whatever a client put in it."""
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return value
    text = json.dumps(value, ensure_ascii=False)  # escapes newlines and the C0 controls
    # ... but not DEL, C1 controls, line separators or bidirectional overrides.
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def record(ctx: CliContext, action: str, target: str = "", **detail) -> None:
    """Append an entry for a CLI action (used by the commands that change users, keys, policies)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.audit import AuditLog

    # The chain only (never the data volume): root's CLI appends while the services hold it.
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
    from appliance.security.audit import audit_log

    result = audit_log(ctx.settings).verify()
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
    from appliance.security.audit import audit_log

    for entry in audit_log(ctx.settings).entries()[-lines:]:
        if as_json:
            click.echo(json.dumps(entry))
        else:
            detail = " ".join(f"{shown(k)}={shown(v)}" for k, v in entry["detail"].items())
            click.echo(
                f"{entry['seq']:>6} {shown(entry['time'])} {shown(entry['actor']):<16} "
                f"{shown(entry['action']):<16} {shown(entry['target'])} {detail}".rstrip()
            )


COMMANDS = [audit_group]
