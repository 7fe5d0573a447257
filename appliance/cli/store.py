"""`appliance store`: keys, load policies and the models in the encrypted store."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from appliance.cli import audit
from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.models import policy_options, signed_policy
from appliance.cli.table import echo_table


@click.group("store")
def store_group() -> None:
    """Encrypted model store: keys, who may load which model, key rotation."""


@store_group.command("init")
@pass_ctx
def init(ctx: CliContext) -> None:
    """Create the key-encryption key and the policy signing key (existing keys are kept)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.store import keyring

    done = keyring.init_keys(ctx.settings)
    for line in done or ["keys already in place; nothing changed"]:
        click.echo(line)


@store_group.command("fingerprint")
def fingerprint() -> None:
    """Print this host's fingerprint (machine id and GPU UUIDs), for `--host` in policies."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.host import this_host_fingerprint

    click.echo(this_host_fingerprint())


@store_group.command("list")
@pass_ctx
def list_stored(ctx: CliContext) -> None:
    """List stored models with size, encryption, key id and policy."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.store.format import StoreHeader

    root = ctx.settings.store_root
    rows = [("MODEL", "SIZE", "ENCRYPTED", "KEY", "USERS", "ROLES", "HOSTS", "EXPIRES")]
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not (d / "header.json").exists():
            continue
        h = StoreHeader.read(d)
        p = (h.policy or {}).get("policy", {})
        rows.append(
            (
                h.model_id,
                f"{h.data_bytes / 1e9:.2f} GB",
                "yes" if h.encrypted else "no",
                (h.key_wrap or {}).get("kek_id", "-"),
                ",".join(p.get("users", [])) or "-",
                ",".join(p.get("roles", [])) or "-",
                str(len(p.get("hosts", []))) if p.get("hosts") else "any",
                p.get("not_after") or "never",
            )
        )
    echo_table(rows)


@store_group.command("rotate-key")
@click.argument("new_key_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@pass_ctx
def rotate(ctx: CliContext, new_key_file: Path) -> None:
    """Rewrap every model's data key, and every encrypted knowledge base's key, under
    NEW_KEY_FILE (weights and volumes are not re-encrypted), then point store.key_file at it on
    every node."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.rag.kb_dirs import rewrap_keys
    from appliance.security.keys import KeyEncryptionKey
    from appliance.store import keyring
    from appliance.store.model import rotate_key

    old = keyring.store_kek(ctx.settings)
    new = KeyEncryptionKey.from_key_file(new_key_file)
    root = ctx.settings.store_root
    count = 0
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if (d / "header.json").exists():
            rotate_key(d, old, new)
            count += 1
    kbs = rewrap_keys(ctx.settings.layout.kb_volumes, old, new)
    audit.record(
        ctx, "store_key_rotate", old.key_id, new_key=new.key_id, models=count, knowledge_bases=kbs
    )
    click.echo(
        f"rewrapped {count} models and {kbs} knowledge bases from key {old.key_id} to key "
        f"{new.key_id}"
    )


@store_group.command("policy")
@click.argument("model")
@policy_options
@pass_ctx
def set_model_policy(
    ctx: CliContext,
    model: str,
    users: tuple[str, ...],
    roles: tuple[str, ...],
    hosts: tuple[str, ...],
    expires: str | None,
) -> None:
    """Replace MODEL's signed load policy."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.store.model import set_policy

    signed = signed_policy(ctx, model, users, roles, hosts, expires)
    set_policy(ctx.settings.store_root / model, signed)
    audit.record(ctx, "policy_change", model, policy=signed["policy"])
    click.echo(f"policy of {model} replaced: {signed['policy']}")


@store_group.command("serve")
@click.option("--node", default=None, help="Node name to report (default: this host's name).")
@click.option(
    "--host",
    default=None,
    help="Address to listen on (default: 127.0.0.1 for a local cluster, else 0.0.0.0).",
)
@click.option("--port", type=int, default=None, help="Port (default: store.service_port).")
@pass_ctx
def serve(ctx: CliContext, node: str | None, host: str | None, port: int | None) -> None:
    """Run this node's store service: what the node holds, per tier, for placement."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    import uvicorn

    from appliance.layout import run_privately
    from appliance.security.node_tls import ensure_internal_ca, internal_ca
    from appliance.security.privileges import run_as_service_user
    from appliance.store.node_service import create_app

    settings = ctx.settings
    # The instance jobs' loaders run as the account the gateway runs as, and the host tier
    # serves only its own account (SO_PEERCRED): it drops to the same one.
    run_as_service_user(settings)
    run_privately(settings.layout)
    node = node or socket.gethostname()
    tls = {}
    if settings.serving.tls:
        # The node's certificate from the internal CA, as its instances serve with (the CA is
        # made here if this single host has none yet; the installer makes it for a cluster).
        ensure_internal_ca(settings)
        cert, key = internal_ca(settings).node_files(node)
        tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if host is None:
        # A local cluster's nodes are all on this host (NodeAddr 127.0.0.1): the gateway asks
        # over the loopback, and nobody else need reach the service.
        host = "127.0.0.1" if settings.cluster.mode == "local" else "0.0.0.0"
    uvicorn.run(
        create_app(settings, node),
        host=host,
        port=port or settings.store.service_port,
        log_level="warning",
        **tls,
    )


COMMANDS = [store_group]
