"""`appliance breaker`: the circuit breaker's SSH ForceCommand entry point, and the
authorized_keys line that pins a key to it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance import envs
from appliance.cli.context import CliContext, pass_ctx

EX_REFUSED = 64  # EX_USAGE: the command is not in the grammar
OPTIONS = "no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-pty,no-user-rc"


@click.group("breaker")
def breaker_group() -> None:
    """The circuit breaker between the web tier and the cluster (SSH ForceCommand)."""


@breaker_group.command("serve")
@pass_ctx
def serve(ctx: CliContext) -> None:
    """Run the one command in $SSH_ORIGINAL_COMMAND if the grammar allows it, or a session of
    framed commands for `session` (sshd runs this for the breaker's key, whatever the client
    asked)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.security.audit import AuditLog
    from appliance.serving.breaker import stdio
    from appliance.serving.breaker.grammar import Refused, parse
    from appliance.slurm.client import SlurmClient
    from appliance.slurm.runner import LocalRunner

    audit_log = AuditLog(ctx.settings.audit_dir)

    def audit(reason: str, command: str) -> None:
        audit_log.append("breaker", "breaker_refused", "", reason=reason, command=command)

    line = envs.SSH_ORIGINAL_COMMAND
    try:
        command = parse(line)
        slurm = SlurmClient(LocalRunner(), ctx.settings.slurm_conf, timeout=30)
        stdio.serve(ctx.settings, slurm, command, audit)
    except Refused as exc:
        audit(str(exc), repr(line)[:120] if line is not None else "none")
        click.echo(f"refused: {exc}", err=True)
        raise SystemExit(EX_REFUSED) from None


def authorized_key_line(python: str, config: Path, public_key: str) -> str:
    """The authorized_keys line that lets this key run the breaker and nothing else."""
    command = f"{python} -m appliance.cli.main --config {config} breaker serve"
    return f'command="{command}",{OPTIONS} {public_key.strip()}'


@breaker_group.command("authorized-key")
@click.argument("public_key_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@pass_ctx
def authorized_key(ctx: CliContext, public_key_file: Path) -> None:
    """Print the authorized_keys line for PUBLIC_KEY_FILE (add it on the cluster's head node)."""
    config = ctx.config_file or Path("/etc/appliance/config.yaml")
    click.echo(authorized_key_line(sys.executable, config.absolute(), public_key_file.read_text()))


COMMANDS = [breaker_group]
