"""`appliance data`: the encrypted data volume that holds the user content (knowledge bases,
conversations, fine-tuning files, uploads): make it, sign its policy, move plaintext in, open,
close, and say where it stands."""

from __future__ import annotations

import datetime as dt

import click

from appliance.cli.audit import record
from appliance.cli.context import CliContext, pass_ctx
from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError

_ACCOUNT = click.option(
    "--account", default=None, help="The account the services run as (default: service_user)."
)
_HOSTS = click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Host fingerprint the volume may open on (repeatable; default: this host's).",
)
_ANY_HOST = click.option("--any-host", is_flag=True, help="Let the volume open on any host.")
_DAYS = click.option(
    "--days", type=click.IntRange(min=1), default=None, help="Valid this many days (default: ever)."
)


def _terms(settings: ApplianceSettings, account, hosts, any_host, days):
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import PolicyTerms, service_account
    from appliance.security.host import this_host_fingerprint

    if any_host and hosts:
        raise click.UsageError("give --host or --any-host, not both")
    hosts = [] if any_host else list(hosts) or [this_host_fingerprint()]
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=days) if days else None
    return PolicyTerms(account or service_account(settings), hosts, until)


def _require_enabled(settings: ApplianceSettings) -> None:
    if not settings.security.data_at_rest.enabled:
        raise ApplianceError(
            "security.data_at_rest is off: the user data is kept unencrypted (turn it on in the "
            "configuration, then `appliance data init`)"
        )


@click.group("data")
def data_group() -> None:
    """The encrypted volume of the user data (security.data_at_rest)."""


@data_group.command("init")
@_ACCOUNT
@_HOSTS
@_ANY_HOST
@_DAYS
@pass_ctx
def init(ctx: CliContext, account, hosts, any_host, days) -> None:
    """Make the data volume: a random key wrapped by the key-encryption key, released by a
    policy signed now (this host and the service account, unless told otherwise)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import init_volume

    settings = ctx.settings
    _require_enabled(settings)
    terms = _terms(settings, account, hosts, any_host, days)
    init_volume(settings, terms)
    record(ctx, "data-init", str(settings.layout.vault), account=terms.account, hosts=terms.hosts)
    click.echo(f"data volume made in {settings.layout.vault}; {_describe(terms)}")


@data_group.command("policy")
@_ACCOUNT
@_HOSTS
@_ANY_HOST
@_DAYS
@pass_ctx
def policy(ctx: CliContext, account, hosts, any_host, days) -> None:
    """Sign a new policy for the data volume (another account, hosts or validity)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import resign

    settings = ctx.settings
    _require_enabled(settings)
    terms = _terms(settings, account, hosts, any_host, days)
    resign(settings, terms)
    record(ctx, "data-policy", "", account=terms.account, hosts=terms.hosts)
    click.echo(f"data policy signed: {_describe(terms)}")


def _describe(terms) -> str:
    hosts = ", ".join(terms.hosts) if terms.hosts else "any host"
    until = terms.not_after.isoformat(timespec="seconds") if terms.not_after else "no expiry"
    return f"opens for {terms.account} on {hosts}, {until}"


@data_group.command("seal")
@pass_ctx
def seal(ctx: CliContext) -> None:
    """Move user content an unencrypted state kept (rag/, conversations/, training/, webapp/)
    into the data volume; run it with the services stopped."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import plaintext_leftovers, seal_plaintext

    settings = ctx.settings
    _require_enabled(settings)
    if not plaintext_leftovers(settings):
        click.echo("nothing to seal: no user content lies unencrypted")
        return
    moved = seal_plaintext(settings, _terms(settings, None, (), False, None))
    record(ctx, "data-seal", str(settings.layout.vault), moved=[p.name for p in moved])
    for path in moved:
        click.echo(f"moved {path} into the data volume")


def _open(settings: ApplianceSettings) -> None:
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import open_volume

    open_volume(settings)


@data_group.command("open")
@pass_ctx
def open_(ctx: CliContext) -> None:
    """Mount the data volume (the services do this as they start)."""
    _require_enabled(ctx.settings)
    _open(ctx.settings)
    click.echo(f"data volume open at {ctx.settings.layout.data}")


@data_group.command("close")
@pass_ctx
def close(ctx: CliContext) -> None:
    """Unmount the data volume (`appliance down` does this once the services stopped)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import close_volume

    _require_enabled(ctx.settings)
    click.echo("data volume closed" if close_volume(ctx.settings) else "data volume not open")


@data_group.command("status")
@pass_ctx
def status(ctx: CliContext) -> None:
    """Whether the user data is encrypted at rest, open or sealed, and its policy."""
    click.echo(describe(ctx.settings))


def describe(settings: ApplianceSettings) -> str:
    """One line on the user data's encryption, for `appliance status` and `data status`."""
    if not settings.security.data_at_rest.enabled:
        return (
            "user data: NOT encrypted at rest (security.data_at_rest is off; the CPU demo has "
            "no key-encryption key, the installer turns it on)"
        )
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import DataSealed, policy_terms, volume

    vol = volume(settings)
    if not vol.exists():
        return "user data: encryption on, but no data volume yet (`appliance data init`)"
    state = "open" if vol.mounted() else "sealed"
    try:
        p = policy_terms(settings)
    except DataSealed as exc:
        return f"user data: encrypted at rest ({state}); {exc}"
    hosts = ", ".join(p.hosts) if p.hosts else "any host"
    until = p.not_after.isoformat(timespec="seconds") if p.not_after else "no expiry"
    return (
        f"user data: encrypted at rest in {vol.cipher_dir} ({state}); "
        f"policy: {', '.join(p.users)} on {hosts}, {until}"
    )


def open_for_service(settings: ApplianceSettings) -> None:
    """At a service's start (as its account): the data volume open, scratch files inside it.
    Nothing when security.data_at_rest is off. DataSealed (the service does not start) when the
    policy refuses."""
    if not settings.security.data_at_rest.enabled:
        return
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.data_volume import use_private_tmp

    _open(settings)
    use_private_tmp(settings)


COMMANDS = [data_group]
