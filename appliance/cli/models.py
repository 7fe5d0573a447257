"""`appliance models`: list the catalog, add local models, build the tiny test model."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.table import echo_table
from appliance.errors import ApplianceError


@click.group("models")
def models_group() -> None:
    """Model catalog: what can be served, what is installed, adding your own."""


@models_group.command("list")
@pass_ctx
def list_models(ctx: CliContext) -> None:
    """List catalog models with their size, needs and whether they are installed here."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.models.catalog import load_catalog

    settings = ctx.settings
    rows = [("NAME", "KIND", "PARAMS", "DISK", "NEEDS", "INSTALLED")]
    for m in load_catalog(settings):
        size = f"{m.size_gb:g} GB"
        installed = "yes" if m.installed(settings) else "no"
        rows.append((m.name, m.kind, m.parameters, size, m.needs(), installed))
    echo_table(rows)


@models_group.command("add")
@click.argument("name")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--kind", type=click.Choice(["chat", "completion", "embedding"]), default="chat")
@click.option("--gpus", type=int, default=0, show_default=True, help="GPUs per instance.")
@click.option("--gpu-memory-gb", type=float, default=0, help="GPU memory one instance needs.")
@click.option("--max-model-len", type=int, default=4096, show_default=True)
@pass_ctx
def add_model(
    ctx: CliContext,
    name: str,
    directory: Path,
    kind: str,
    gpus: int,
    gpu_memory_gb: float,
    max_model_len: int,
) -> None:
    """Add a Hugging Face-format model from a local DIRECTORY to the catalog as NAME."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.models.catalog import ModelResources, ModelSpec, add_local_model

    directory = directory.resolve()
    if not (directory / "config.json").exists():
        raise ApplianceError(f"{directory} has no config.json: not a Hugging Face model directory")
    spec = ModelSpec(
        name=name,
        kind=kind,
        source=f"dir:{directory}",
        path=directory,
        max_model_len=max_model_len,
        resources=ModelResources(gpus=gpus, gpu_memory_gb=gpu_memory_gb, cpu_fallback=gpus == 0),
    )
    add_local_model(ctx.settings, spec)
    click.echo(f"added {name} ({directory}) to {ctx.settings.user_catalog_file}")


@models_group.command("build-tiny")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Output directory (default: <models_dir>/tiny-chat).",
)
@click.option(
    "--time-budget",
    type=float,
    default=170.0,
    show_default=True,
    help="Seconds of training at most.",
)
@click.option("--force", is_flag=True, help="Rebuild even if the model already exists.")
@pass_ctx
def build_tiny(ctx: CliContext, out: Path | None, time_budget: float, force: bool) -> None:
    """Train the tiny chat model offline (tokenizer + small Llama), for tests and the CPU demo."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists

    out = out or ctx.settings.models_dir / "tiny-chat"
    if tiny_model_exists(out) and not force:
        click.echo(f"tiny model already built at {out} (use --force to rebuild)")
        return
    report = build_tiny_model(out, time_budget_s=time_budget, progress=click.echo)
    click.echo(f"built tiny model at {out}: {report.summary()}")


def parse_expiry(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO date such as 2027-06-30") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def signed_policy(
    ctx: CliContext,
    model: str,
    users: tuple[str, ...],
    roles: tuple[str, ...],
    hosts: tuple[str, ...],
    expires: str | None,
):
    """The load policy the --user/--role/--host/--expires options describe, signed."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.store import keyring

    return keyring.sign_policy(
        ctx.settings,
        model,
        users=list(users),
        roles=list(roles),
        hosts=list(hosts),
        not_after=parse_expiry(expires),
    )


def policy_options(func):
    """--user/--role/--host/--expires: who may load a model, where, until when."""
    for option in reversed(
        [
            click.option("--user", "users", multiple=True, help="User allowed to load it."),
            click.option("--role", "roles", multiple=True, help="Role allowed to load it."),
            click.option(
                "--host",
                "hosts",
                multiple=True,
                help="Host fingerprint allowed to load it (`appliance store fingerprint`).",
            ),
            click.option("--expires", default=None, help="Refuse loads after this date (UTC)."),
        ]
    ):
        func = option(func)
    return func


@models_group.command("import")
@click.argument("source")
@click.option("--name", default=None, help="Model name in the catalog (default: from SOURCE).")
@click.option("--no-encrypt", is_flag=True, help="Store the weights in plaintext.")
@click.option("--replace", is_flag=True, help="Replace a model of that name already stored.")
@click.option("--max-model-len", type=int, default=4096, show_default=True)
@click.option("--gpus", type=int, default=0, show_default=True, help="GPUs per instance.")
@click.option("--gpu-memory-gb", type=float, default=0, help="GPU memory one instance needs.")
@policy_options
@pass_ctx
def import_model(
    ctx: CliContext,
    source: str,
    name: str | None,
    no_encrypt: bool,
    replace: bool,
    max_model_len: int,
    gpus: int,
    gpu_memory_gb: float,
    users: tuple[str, ...],
    roles: tuple[str, ...],
    hosts: tuple[str, ...],
    expires: str | None,
) -> None:
    """Import a Hugging Face checkpoint (a local directory, or a hub id when online) into the
    encrypted store, check it bit for bit, and add it to the catalog.

    \b
    Without --user/--role the model may be loaded by the serving identity's roles
    (store.load_roles); without --host, on any host; without --expires, with no end date.
    """
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.models.catalog import ModelResources
    from appliance.store.hub import resolve_source
    from appliance.store.publish import publish_checkpoint

    settings = ctx.settings
    directory, default_name = resolve_source(source)
    name = name or default_name
    encrypt = settings.store.encrypt and not no_encrypt
    spec = publish_checkpoint(
        settings,
        directory,
        name,
        encrypt=encrypt,
        policy=lambda: signed_policy(ctx, name, users, roles, hosts, expires),
        max_model_len=max_model_len,
        resources=ModelResources(gpus=gpus, gpu_memory_gb=gpu_memory_gb, cpu_fallback=gpus == 0),
        replace=replace,
        progress=True,
        say=click.echo,
    )
    path = spec.model_dir(settings)
    state = "encrypted" if encrypt else "plaintext"
    click.echo(f"imported {name} ({state}, verified) into {path}; added to the catalog")


COMMANDS = [models_group]
