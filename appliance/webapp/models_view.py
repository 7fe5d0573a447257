"""The Models tab: the catalog with sizes, needs and states; for administrators, the running
instances (which Slurm job, which node) and start/stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from appliance.webapp import render
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, gateway, is_admin, signed_in, token_of


@dataclass
class ModelsView:
    """What the app wires to sign-in: refresh the tab for the signed-in user."""

    on_sign_in: Callable[[Any], Any]


def build_models(ctx: WebContext) -> ModelsView:
    my_usage = gr.Markdown("", elem_id="my-usage")
    catalog = gr.Dataframe(
        headers=render.CATALOG_HEADERS, value=[], interactive=False, label="Catalog",
        elem_id="catalog",
    )  # fmt: skip
    with gr.Group(visible=False) as admin_box:
        instances = gr.Dataframe(
            headers=render.INSTANCE_HEADERS, value=[], interactive=False,
            label="Instances (administrators)", elem_id="instances",
        )  # fmt: skip
        with gr.Row():
            start_model = gr.Dropdown(label="Model", choices=[], scale=3)
            start_btn = gr.Button("Start an instance", variant="primary", scale=1)
        with gr.Row():
            stop_job = gr.Dropdown(
                label="Instance (Slurm job)", choices=[], scale=3, elem_id="stop-job"
            )
            stop_btn = gr.Button(
                "Stop the instance", variant="stop", scale=1, elem_id="stop-instance"
            )
    timer = gr.Timer(5.0)

    async def refresh(session):
        if not signed_in(session):
            return [], gr.Group(visible=False), [], gr.skip(), gr.skip(), ""
        token = token_of(session)
        try:
            models = await ctx.client.models(token)
            usage = render.usage_markdown(await ctx.client.my_usage(token))
        except GatewayError:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if not is_admin(session):
            return (
                render.catalog_rows(models), gr.Group(visible=False), [], gr.skip(), gr.skip(),
                usage,
            )  # fmt: skip
        try:
            live = await ctx.client.instances(token)
        except GatewayError:
            live = []
        jobs = [
            (f"{i['job_id']} ({i['model']} on {i.get('node') or '?'})", i["job_id"]) for i in live
        ]
        return (
            render.catalog_rows(models),
            gr.Group(visible=True),
            render.instance_rows(live),
            gr.Dropdown(choices=[m["id"] for m in models if m.get("installed")]),
            gr.Dropdown(choices=jobs),
            usage,
        )

    shown = [catalog, admin_box, instances, start_model, stop_job, my_usage]
    timer.tick(refresh, [ctx.session], shown, show_progress="hidden")

    async def start(session, model):
        if not model:
            gr.Warning("Choose a model.")
            return
        inst = await gateway(ctx.client.start_model(token_of(session), model))
        gr.Info(f"{model}: Slurm job {inst['job_id']} submitted.")

    start_btn.click(start, [ctx.session, start_model], None).then(refresh, [ctx.session], shown)

    async def stop(session, job_id):
        if not job_id:
            gr.Warning("Choose an instance.")
            return
        await gateway(ctx.client.stop_instance(token_of(session), int(job_id)))
        gr.Info(f"Instance {job_id} is stopping.")

    stop_btn.click(stop, [ctx.session, stop_job], None).then(refresh, [ctx.session], shown)
    return ModelsView(lambda dep: dep.then(refresh, [ctx.session], shown))
