"""`appliance keys`: API keys for the gateway (shown once, stored hashed)."""

from __future__ import annotations

import datetime as dt

import click

from appliance.cli import audit
from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.models import parse_expiry
from appliance.cli.table import echo_table


@click.group("keys")
def keys_group() -> None:
    """API keys: who may use the gateway. With no keys at all, the gateway is single-user."""


@keys_group.command("create")
@click.argument("user")
@click.option("--admin", is_flag=True, help="An administrator (instances, models, all KBs).")
@click.option("--group", "groups", multiple=True, help="Group the user belongs to.")
@click.option("--expires", default=None, help="The key stops working after this date (UTC).")
@pass_ctx
def create(
    ctx: CliContext, user: str, admin: bool, groups: tuple[str, ...], expires: str | None
) -> None:
    """Create an API key for USER and print it (this once: only its hash is kept)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.api_keys import ApiKeyStore

    expires_at = parse_expiry(expires)
    # A key born expired is a mistake (a typo in the year), not a way to make a dead key.
    if expires_at is not None and expires_at <= dt.datetime.now(dt.UTC):
        raise click.BadParameter(
            f"{expires!r} is in the past: give a later date, such as 2027-06-30",
            param_hint="'--expires'",
        )
    secret, record = ApiKeyStore(ctx.settings.api_keys_file).create(
        user, "admin" if admin else "user", list(groups), expires_at
    )
    audit.record(
        ctx,
        "key_create",
        record.key_id,
        user=user,
        role=record.role,
        groups=list(groups),
        expires_at=record.expires_at,
    )
    click.echo(f"key {record.key_id} for {user} ({record.role}); store it now, it is not kept:")
    click.echo(secret)


@keys_group.command("list")
@pass_ctx
def list_keys(ctx: CliContext) -> None:
    """List keys (ids, users, roles, expiry, revocation; never the keys)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.api_keys import ApiKeyStore

    rows = [("ID", "KIND", "USER", "ROLE", "GROUPS", "EXPIRES", "REVOKED")]
    for r in ApiKeyStore(ctx.settings.api_keys_file).records():
        rows.append(
            (
                r.key_id,
                r.kind,
                r.user,
                r.role,
                ",".join(r.groups) or "-",
                r.expires_at or "never",
                r.revoked_at or "-",
            )
        )
    echo_table(rows)


@keys_group.command("revoke")
@click.argument("key_id")
@pass_ctx
def revoke(ctx: CliContext, key_id: str) -> None:
    """Revoke a key at once (the gateway re-reads the keys file when it changes)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.api_keys import ApiKeyStore

    record = ApiKeyStore(ctx.settings.api_keys_file).revoke(key_id)
    audit.record(ctx, "key_revoke", record.key_id, user=record.user)
    click.echo(f"revoked key {record.key_id} of {record.user}")


COMMANDS = [keys_group]
