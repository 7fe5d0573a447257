"""`appliance instances`: see, start, drain and stop model instances through the gateway's admin
API."""

from __future__ import annotations

import click

from appliance.cli.api import gateway_call
from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.table import echo_table


def _call(ctx: CliContext, method: str, path: str) -> dict:
    return gateway_call(ctx, method, path, timeout=30)


@click.group("instances")
def instances_group() -> None:
    """Model instances (Slurm jobs running a model server) known to the gateway."""


@instances_group.command("list")
@pass_ctx
def list_instances(ctx: CliContext) -> None:
    """Show every instance: model, Slurm job, node, state and load."""
    rows = [("JOB", "MODEL", "STATE", "NODE", "INFLIGHT", "SERVED", "URL / REASON")]
    for i in _call(ctx, "GET", "/admin/instances")["instances"]:
        rows.append(
            (
                str(i["job_id"]),
                i["model"],
                i["state"],
                i["node"] or "-",
                str(i["inflight"]),
                str(i["served"]),
                i["url"] or i["reason"] or "-",
            )
        )
    echo_table(rows)


@instances_group.command("start")
@click.argument("model")
@pass_ctx
def start(ctx: CliContext, model: str) -> None:
    """Start one more instance of MODEL (requests also start one when none is up)."""
    i = _call(ctx, "POST", f"/admin/models/{model}/start")
    click.echo(f"submitted job {i['job_id']} for {model}")


@instances_group.command("stop")
@click.argument("job_id", type=int)
@pass_ctx
def stop(ctx: CliContext, job_id: int) -> None:
    """Stop the instance running as Slurm job JOB_ID."""
    _call(ctx, "POST", f"/admin/instances/{job_id}/stop")
    click.echo(f"stopping job {job_id}")


@instances_group.command("drain")
@click.argument("job_id", type=int)
@pass_ctx
def drain(ctx: CliContext, job_id: int) -> None:
    """Move the running answers of instance JOB_ID to other instances, then stop it."""
    i = _call(ctx, "POST", f"/admin/instances/{job_id}/drain")
    click.echo(f"draining job {job_id}: {i['inflight']} request(s) to move")


COMMANDS = [instances_group]
