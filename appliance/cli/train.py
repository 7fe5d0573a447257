"""`appliance train`: LoRA fine-tuning jobs through the gateway's API (upload a dataset, start,
follow, cancel); the job runs on Slurm and its model joins the catalog when it succeeds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from appliance.cli.api import gateway_call
from appliance.cli.context import CliContext, pass_ctx
from appliance.cli.table import echo_table
from appliance.errors import ApplianceError

FINAL = ("succeeded", "failed", "cancelled")


@click.group("train")
def train_group() -> None:
    """Fine-tune a catalog model on your data (LoRA, as a Slurm job)."""


def _line(job: dict) -> str:
    p = job["progress"]
    step = f"step {p['step'] or 0}/{p['total_steps'] or '?'}"
    loss = f" loss {p['loss']:.4f}" if p.get("loss") is not None else ""
    eta = f" eta {job['eta_s']:.0f}s" if job.get("eta_s") else ""
    return f"{job['id']} {job['status']}: {step}{loss}{eta}"


@train_group.command("start")
@click.argument("model")
@click.argument("dataset", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--suffix", default=None, help="Name of the result: MODEL-ft-SUFFIX.")
@click.option("--epochs", type=float, default=None, help="Passes over the data (default 3).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides epochs).")
@click.option("--learning-rate", type=float, default=None, help="Peak learning rate (2e-4).")
@click.option("--batch-size", type=int, default=None, help="Examples per step (4).")
@click.option("--lora-rank", type=int, default=None, help="LoRA rank r (16).")
@click.option("--wait", is_flag=True, help="Follow the job until it ends.")
@pass_ctx
def start(
    ctx: CliContext,
    model: str,
    dataset: Path,
    suffix: str | None,
    wait: bool,
    **hyper: float | int | None,
) -> None:
    """Check DATASET (JSONL: chat messages or prompt/completion pairs) and queue a job that
    fine-tunes MODEL on it. Problems are listed by line before anything is queued."""
    with dataset.open("rb") as f:
        uploaded = gateway_call(
            ctx,
            "POST",
            "/v1/files",
            timeout=300,
            files={"file": (dataset.name, f)},
            data={"purpose": "fine-tune"},
        )
    body = {
        "model": model,
        "training_file": uploaded["id"],
        "hyperparameters": {k: v for k, v in hyper.items() if v is not None},
    }
    if suffix:
        body["suffix"] = suffix
    job = gateway_call(ctx, "POST", "/v1/fine_tuning/jobs", timeout=300, json=body)
    click.echo(
        f"{job['id']} queued: {job['train_examples']} training and "
        f"{job['eval_examples']} held-out examples; the result will be "
        f"{job['output_model']}"
    )
    if wait:
        _follow(ctx, job["id"])


def _follow(ctx: CliContext, job_id: str) -> None:
    last = ""
    while True:
        job = gateway_call(ctx, "GET", f"/v1/fine_tuning/jobs/{job_id}")
        line = _line(job)
        if line != last:
            click.echo(line)
            last = line
        if job["status"] in FINAL:
            break
        time.sleep(2)
    if job["status"] != "succeeded":
        raise ApplianceError(f"job {job_id} {job['status']}: {job.get('error') or ''}".strip())
    r = job["result"]
    click.echo(
        f"held-out loss {r['base_eval_loss']:.4f} -> {r['tuned_eval_loss']:.4f} "
        f"(perplexity {r['base_perplexity']:.1f} -> {r['tuned_perplexity']:.1f}); "
        f"chat with model {job['fine_tuned_model']}"
    )


@train_group.command("list")
@pass_ctx
def list_jobs(ctx: CliContext) -> None:
    """Your fine-tuning jobs (an administrator sees everyone's)."""
    rows = [("JOB", "MODEL", "USER", "STATUS", "STEP", "LOSS", "RESULT")]
    for j in gateway_call(ctx, "GET", "/v1/fine_tuning/jobs")["data"]:
        p = j["progress"]
        rows.append(
            (
                j["id"],
                j["model"],
                j["user"],
                j["status"],
                f"{p['step'] or 0}/{p['total_steps'] or '?'}",
                f"{p['loss']:.4f}" if p.get("loss") is not None else "-",
                j["fine_tuned_model"] or j["output_model"],
            )
        )
    echo_table(rows)


@train_group.command("show")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Follow the job until it ends.")
@pass_ctx
def show(ctx: CliContext, job_id: str, follow: bool) -> None:
    """A job's record, progress and result, as JSON."""
    if follow:
        _follow(ctx, job_id)
        return
    click.echo(json.dumps(gateway_call(ctx, "GET", f"/v1/fine_tuning/jobs/{job_id}"), indent=1))


@train_group.command("logs")
@click.argument("job_id")
@pass_ctx
def logs(ctx: CliContext, job_id: str) -> None:
    """The last lines of a job's log."""
    for event in gateway_call(ctx, "GET", f"/v1/fine_tuning/jobs/{job_id}/events")["data"]:
        click.echo(event["message"])


@train_group.command("cancel")
@click.argument("job_id")
@pass_ctx
def cancel(ctx: CliContext, job_id: str) -> None:
    """Stop a job (it writes a checkpoint first)."""
    job = gateway_call(ctx, "POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")
    click.echo(f"{job['id']} {job['status']}")


COMMANDS = [train_group]
