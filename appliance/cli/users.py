"""`appliance users`: accounts that sign in with a password (the web app, `/v1/auth/sign_in`)."""

from __future__ import annotations

import sys

import click

from appliance.cli import audit
from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.table import echo_table


@click.group("users")
def users_group() -> None:
    """User accounts. With no accounts and no API keys, the appliance is single-user."""


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("password", hide_input=True, confirmation_prompt=True)


@users_group.command("add")
@click.argument("username")
@click.option("--admin", is_flag=True, help="An administrator (instances, models, all KBs).")
@click.option("--group", "groups", multiple=True, help="Group the user belongs to.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_ctx
def add(
    ctx: CliContext, username: str, admin: bool, groups: tuple[str, ...], password_stdin: bool
) -> None:
    """Create the account USERNAME (asks for its password)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.users import UserStore

    record = UserStore(ctx.settings.users_file).add(
        username, _read_password(password_stdin), "admin" if admin else "user", list(groups)
    )
    audit.record(ctx, "user_add", username, role=record.role, groups=record.groups)
    click.echo(f"user {record.username} ({record.role}) created")


@users_group.command("list")
@pass_ctx
def list_users(ctx: CliContext) -> None:
    """List accounts (never their passwords)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.users import UserStore

    rows = [("USER", "ROLE", "GROUPS", "CREATED", "DISABLED")]
    for u in UserStore(ctx.settings.users_file).records():
        rows.append(
            (
                u.username,
                u.role,
                ",".join(u.groups) or "-",
                u.created_at,
                "yes" if u.disabled else "-",
            )
        )
    echo_table(rows)


@users_group.command("passwd")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_ctx
def passwd(ctx: CliContext, username: str, password_stdin: bool) -> None:
    """Set USERNAME's password; the user's sign-in sessions end."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.api_keys import ApiKeyStore
    from appliance.security.users import UserStore

    UserStore(ctx.settings.users_file).set_password(username, _read_password(password_stdin))
    _end_sessions(ApiKeyStore(ctx.settings.api_keys_file), username)
    audit.record(ctx, "password_change", username)
    click.echo(f"password of {username} changed")


def _end_sessions(keys, username: str) -> None:
    for r in keys.records():
        if r.user == username and r.kind == "session" and not r.revoked_at:
            keys.revoke(r.key_id)


@users_group.command("disable")
@click.argument("username")
@pass_ctx
def disable(ctx: CliContext, username: str) -> None:
    """Stop USERNAME from signing in, and revoke all of the user's keys and sessions."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.api_keys import ApiKeyStore
    from appliance.security.users import UserStore

    UserStore(ctx.settings.users_file).set_disabled(username, True)
    count = ApiKeyStore(ctx.settings.api_keys_file).revoke_user(username)
    audit.record(ctx, "user_disable", username, keys_revoked=count)
    click.echo(f"{username} disabled; {count} keys and sessions revoked")


@users_group.command("enable")
@click.argument("username")
@pass_ctx
def enable(ctx: CliContext, username: str) -> None:
    """Let a disabled USERNAME sign in again (revoked keys stay revoked)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.users import UserStore

    UserStore(ctx.settings.users_file).set_disabled(username, False)
    audit.record(ctx, "user_enable", username)
    click.echo(f"{username} enabled")


@users_group.command("remove")
@click.argument("username")
@pass_ctx
def remove(ctx: CliContext, username: str) -> None:
    """Delete the account USERNAME and revoke all of the user's keys and sessions."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.api_keys import ApiKeyStore
    from appliance.security.users import UserStore

    UserStore(ctx.settings.users_file).remove(username)
    count = ApiKeyStore(ctx.settings.api_keys_file).revoke_user(username)
    audit.record(ctx, "user_remove", username, keys_revoked=count)
    click.echo(f"{username} removed; {count} keys and sessions revoked")


COMMANDS = [users_group]
