"""The Training tab: fine-tune a catalog model on an uploaded dataset (JSONL), follow the job's
step, loss, learning rate, throughput and time left live, see the held-out evaluation of base
and tuned model at the end, cancel, and read the job's log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from appliance.config.training import Hyperparameters
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, bind, gateway, signed_in, token_of

JOB_HEADERS = [
    "Job",
    "Base model",
    "Status",
    "Step",
    "Loss",
    "Learning rate",
    "Tokens/s",
    "Time left",
    "Held-out loss (base → tuned)",
    "Result",
]


@dataclass
class TrainingView:
    """What the app wires to sign-in: refresh the tab for the signed-in user."""

    on_sign_in: Callable[[Any], Any]


def _minutes(seconds: float | None) -> str:
    if not seconds:
        return ""
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _evaluation(progress: dict[str, Any], result: dict[str, Any]) -> str:
    """Held-out loss of base and tuned model; the base's alone while the job runs."""
    if result:
        return f"{result['base_eval_loss']:.3f} → {result['tuned_eval_loss']:.3f}"
    if progress.get("base_eval_loss"):
        return f"{progress['base_eval_loss']:.3f} → …"
    return ""


def _optional(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def job_rows(jobs: list[dict]) -> list[list[Any]]:
    rows = []
    for j in jobs:
        p, r = j["progress"], j.get("result") or {}
        rows.append(
            [
                j["id"],
                j["model"],
                j["status"] + (f" ({j['error']})" if j.get("error") else ""),
                f"{p['step'] or 0} / {p['total_steps'] or '?'}",
                _optional(p.get("loss"), ".4f"),
                _optional(p.get("learning_rate"), ".2e"),
                f"{p['tokens_per_s']:.0f}" if p.get("tokens_per_s") else "",
                _minutes(j.get("eta_s")),
                _evaluation(p, r),
                j.get("fine_tuned_model") or "",
            ]
        )
    return rows


@dataclass
class TrainingComponents:
    """The Training tab's components."""

    base: gr.Dropdown
    suffix: gr.Textbox
    dataset: gr.File
    epochs: gr.Number
    max_steps: gr.Number
    lr: gr.Number
    batch: gr.Number
    rank: gr.Number
    start_btn: gr.Button
    outcome: gr.Markdown
    jobs: gr.Dataframe
    pick: gr.Dropdown
    cancel_btn: gr.Button
    log_btn: gr.Button
    loss_plot: gr.LinePlot
    log: gr.Textbox
    timer: gr.Timer


INTRO = (
    "Fine-tune a model on your own examples: a JSONL file of chat conversations "
    '(`{"messages": [...]}`, ending with the answer to learn) or '
    '`{"prompt": ..., "completion": ...}` pairs. Every line is checked before the '
    "job is queued; a share is held out to compare base and tuned model."
)


def training_components(defaults: Hyperparameters) -> TrainingComponents:
    gr.Markdown(INTRO)
    with gr.Row():
        base = gr.Dropdown(label="Base model", choices=[], scale=2, elem_id="ft-model")
        suffix = gr.Textbox(
            label="Name of the result (suffix)",
            max_lines=1,
            scale=2,
            placeholder="e.g. support",
            elem_id="ft-suffix",
        )
    dataset = gr.File(
        label="Dataset (.jsonl)", file_types=[".jsonl", ".json"], elem_id="ft-dataset"
    )
    with gr.Accordion("Hyperparameters", open=False), gr.Row():
        epochs = gr.Number(label="Epochs", value=defaults.epochs, minimum=0.1)
        max_steps = gr.Number(
            label="Steps (0: from the epochs)", value=0, minimum=0, precision=0, elem_id="ft-steps"
        )
        lr = gr.Number(
            label="Learning rate", value=defaults.learning_rate, minimum=0, elem_id="ft-lr"
        )
        batch = gr.Number(label="Batch size", value=defaults.batch_size, minimum=1, precision=0)
        rank = gr.Number(label="LoRA rank", value=defaults.lora_rank, minimum=1, precision=0)
    start_btn = gr.Button("Start fine-tuning", variant="primary", elem_id="ft-start")
    outcome = gr.Markdown("", elem_id="ft-outcome")
    jobs = gr.Dataframe(
        headers=JOB_HEADERS,
        value=[],
        interactive=False,
        wrap=True,
        label="Fine-tuning jobs",
        elem_id="ft-jobs",
    )
    with gr.Row():
        pick = gr.Dropdown(label="Job", choices=[], scale=3, elem_id="ft-pick")
        cancel_btn = gr.Button("Cancel the job", variant="stop", scale=1, elem_id="ft-cancel")
        log_btn = gr.Button("Show its log", scale=1, elem_id="ft-log-btn")
    loss_plot = gr.LinePlot(
        x="step", y="loss", title="Training loss", height=240, elem_id="ft-loss"
    )
    log = gr.Textbox(label="Log", lines=10, max_lines=20, visible=False, elem_id="ft-log")
    timer = gr.Timer(3.0)
    return TrainingComponents(
        base,
        suffix,
        dataset,
        epochs,
        max_steps,
        lr,
        batch,
        rank,
        start_btn,
        outcome,
        jobs,
        pick,
        cancel_btn,
        log_btn,
        loss_plot,
        log,
        timer,
    )


async def refresh(ctx: WebContext, session, chosen):
    """The models that can be tuned, the user's jobs, and the chosen job's loss curve."""
    if not signed_in(session):
        return gr.skip(), [], gr.Dropdown(choices=[], value=None), None
    token = token_of(session)
    try:
        models = await ctx.client.models(token)
        listed = await ctx.client.fine_tunes(token)
    except GatewayError:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    tunable = [
        m["id"] for m in models if m.get("installed") and m.get("kind", "chat") != "embedding"
    ]
    ids = [j["id"] for j in listed]
    chosen = chosen if chosen in ids else (ids[0] if ids else None)
    points = None
    if chosen:
        try:
            metrics = await ctx.client.fine_tune_metrics(token, chosen)
            points = {"step": [m["step"] for m in metrics], "loss": [m["loss"] for m in metrics]}
        except GatewayError:
            pass
    return (
        gr.Dropdown(choices=tunable),
        job_rows(listed),
        gr.Dropdown(choices=ids, value=chosen),
        pd.DataFrame(points) if points else None,
    )


async def start(ctx: WebContext, session, model, path, suffix_text, n_epochs, steps, rate, size, r):
    """Upload the dataset and queue the job; what was queued, or nothing when refused."""
    if not model or not path:
        gr.Warning("Choose a base model and a dataset.")
        return gr.skip()
    token = token_of(session)
    uploaded = await gateway(ctx.client.upload_dataset(token, Path(path), Path(path).name))
    hp = {"epochs": n_epochs, "learning_rate": rate, "batch_size": int(size), "lora_rank": int(r)}
    if steps:
        hp["max_steps"] = int(steps)
    body = {"model": model, "training_file": uploaded["id"], "hyperparameters": hp}
    if suffix_text.strip():
        body["suffix"] = suffix_text.strip()
    job = await gateway(ctx.client.create_fine_tune(token, body))
    return (
        f"**{job['id']}** queued: {job['train_examples']} training and "
        f"{job['eval_examples']} held-out examples. The result will be "
        f"**{job['output_model']}**."
    )


async def cancel(ctx: WebContext, session, job_id):
    if not job_id:
        gr.Warning("Choose a job.")
        return
    job = await gateway(ctx.client.cancel_fine_tune(token_of(session), job_id))
    gr.Info(f"{job['id']}: {job['status']}.")


async def show_log(ctx: WebContext, session, job_id):
    if not job_id:
        return gr.Textbox(visible=False)
    text = await gateway(ctx.client.fine_tune_log(token_of(session), job_id))
    return gr.Textbox(value=text or "(nothing logged yet)", visible=True)


def build_training(ctx: WebContext) -> TrainingView:
    return wire_training(ctx, training_components(ctx.settings.training.defaults))


def wire_training(ctx: WebContext, c: TrainingComponents) -> TrainingView:
    """Connect the tab's components to its handlers; it follows the jobs on a timer."""
    shown = [c.base, c.jobs, c.pick, c.loss_plot]
    again = dict(fn=bind(ctx, refresh), inputs=[ctx.session, c.pick], outputs=shown)
    c.timer.tick(**again, show_progress="hidden")
    c.pick.input(**again)
    hyperparameters = [c.epochs, c.max_steps, c.lr, c.batch, c.rank]
    starting = [ctx.session, c.base, c.dataset, c.suffix, *hyperparameters]
    c.start_btn.click(bind(ctx, start), starting, c.outcome).then(**again)
    c.cancel_btn.click(bind(ctx, cancel), [ctx.session, c.pick], None).then(**again)
    c.log_btn.click(bind(ctx, show_log), [ctx.session, c.pick], c.log)
    return TrainingView(lambda dep: dep.then(**again))
