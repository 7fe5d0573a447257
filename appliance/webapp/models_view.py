"""The Models tab: the catalog with sizes, needs and states; for administrators, the running
instances (which Slurm job, which node) and start/stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from appliance.webapp import render
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, bind, gateway, is_admin, signed_in, token_of


@dataclass
class ModelsView:
    """What the app wires to sign-in: refresh the tab for the signed-in user."""

    on_sign_in: Callable[[Any], Any]


@dataclass
class ModelsComponents:
    """The Models tab's components: the user's usage, the catalog and the administrators' box."""

    my_usage: gr.Markdown
    catalog: gr.Dataframe
    admin_box: gr.Group
    instances: gr.Dataframe
    start_model: gr.Dropdown
    start_btn: gr.Button
    stop_job: gr.Dropdown
    stop_btn: gr.Button
    timer: gr.Timer


def models_components() -> ModelsComponents:
    my_usage = gr.Markdown("", elem_id="my-usage")
    catalog = gr.Dataframe(
        headers=render.CATALOG_HEADERS,
        value=[],
        interactive=False,
        label="Catalog",
        elem_id="catalog",
    )
    with gr.Group(visible=False) as admin_box:
        instances = gr.Dataframe(
            headers=render.INSTANCE_HEADERS,
            value=[],
            interactive=False,
            label="Instances (administrators)",
            elem_id="instances",
        )
        with gr.Row():
            start_model = gr.Dropdown(label="Model", choices=[], scale=3, elem_id="start-model")
            start_btn = gr.Button(
                "Start an instance", variant="primary", scale=1, elem_id="start-instance"
            )
        with gr.Row():
            stop_job = gr.Dropdown(
                label="Instance (Slurm job)", choices=[], scale=3, elem_id="stop-job"
            )
            stop_btn = gr.Button(
                "Stop the instance", variant="stop", scale=1, elem_id="stop-instance"
            )
    timer = gr.Timer(5.0)
    return ModelsComponents(
        my_usage, catalog, admin_box, instances, start_model, start_btn, stop_job, stop_btn, timer
    )


async def refresh(ctx: WebContext, session):
    """The catalog and the user's usage; for administrators also the instances."""
    if not signed_in(session):
        return [], gr.Group(visible=False), [], gr.skip(), gr.skip(), ""
    token = token_of(session)
    try:
        models = await ctx.client.models(token)
        usage = render.usage_markdown(await ctx.client.my_usage(token))
    except GatewayError:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    catalog = render.catalog_rows(models)
    if not is_admin(session):
        return catalog, gr.Group(visible=False), [], gr.skip(), gr.skip(), usage
    try:
        live = await ctx.client.instances(token)
    except GatewayError:
        live = []
    jobs = [(f"{i['job_id']} ({i['model']} on {i.get('node') or '?'})", i["job_id"]) for i in live]
    return (
        catalog,
        gr.Group(visible=True),
        render.instance_rows(live),
        gr.Dropdown(choices=[m["id"] for m in models if m.get("installed")]),
        gr.Dropdown(choices=jobs),
        usage,
    )


async def start(ctx: WebContext, session, model):
    if not model:
        gr.Warning("Choose a model.")
        return
    inst = await gateway(ctx.client.start_model(token_of(session), model))
    gr.Info(f"{model}: Slurm job {inst['job_id']} submitted.")


async def stop(ctx: WebContext, session, job_id):
    if not job_id:
        gr.Warning("Choose an instance.")
        return
    await gateway(ctx.client.stop_instance(token_of(session), int(job_id)))
    gr.Info(f"Instance {job_id} is stopping.")


def build_models(ctx: WebContext) -> ModelsView:
    return wire_models(ctx, models_components())


def wire_models(ctx: WebContext, c: ModelsComponents) -> ModelsView:
    """Connect the tab's components to its handlers; it follows the models on a timer."""
    shown = [c.catalog, c.admin_box, c.instances, c.start_model, c.stop_job, c.my_usage]
    again = dict(fn=bind(ctx, refresh), inputs=[ctx.session], outputs=shown)
    c.timer.tick(**again, show_progress="hidden")
    c.start_btn.click(bind(ctx, start), [ctx.session, c.start_model], None).then(**again)
    c.stop_btn.click(bind(ctx, stop), [ctx.session, c.stop_job], None).then(**again)
    return ModelsView(lambda dep: dep.then(**again))
