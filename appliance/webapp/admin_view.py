"""The Admin tab (administrators): users, API keys (a new key is shown once), everyone's usage
against their limits, and the audit log with its verification."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from appliance.webapp import render
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, gateway, is_admin, token_of

USER_HEADERS = ["User", "Role", "Groups", "Created", "Disabled"]
KEY_HEADERS = ["Key id", "User", "Role", "Created", "Expires", "Revoked"]
USAGE_HEADERS = ["Kind", "Name", "Requests (last minute)", "Tokens today", "Streams open",
                 "Limits"]  # fmt: skip
AUDIT_HEADERS = ["#", "Time", "Actor", "Action", "Target", "Details"]


def _limits(limits: dict[str, Any]) -> str:
    shown = [f"{k.replace('_', ' ')} {v}" for k, v in limits.items() if v is not None]
    return ", ".join(shown) or "none"


@dataclass
class AdminView:
    """What the app wires to sign-in: show the tab's content to administrators."""

    on_sign_in: Callable[[Any], Any]


def build_admin(ctx: WebContext) -> AdminView:
    note = gr.Markdown("Administration is for administrators.", elem_id="admin-note")
    with gr.Column(visible=False, elem_id="admin-body") as body:
        gr.Markdown("### Users")
        users = gr.Dataframe(headers=USER_HEADERS, value=[], interactive=False,
                             elem_id="admin-users")  # fmt: skip
        with gr.Row():
            new_user = gr.Textbox(label="User name", max_lines=1, elem_id="admin-new-user")
            new_password = gr.Textbox(label="Password (8 or more characters)", type="password",
                                      max_lines=1, elem_id="admin-new-password")  # fmt: skip
            new_role = gr.Radio(["user", "admin"], value="user", label="Role")
            new_groups = gr.Textbox(label="Groups", max_lines=1)
        add_user_btn = gr.Button("Add user", variant="primary", elem_id="admin-add-user")
        with gr.Row():
            pick_user = gr.Dropdown(label="User", choices=[], scale=3)
            disable_btn = gr.Button("Disable (ends their keys and sessions)", variant="stop")
            enable_btn = gr.Button("Enable")
        gr.Markdown("### API keys")
        keys = gr.Dataframe(headers=KEY_HEADERS, value=[], interactive=False,
                            elem_id="admin-keys")  # fmt: skip
        with gr.Row():
            key_user = gr.Textbox(label="For user", max_lines=1, elem_id="admin-key-user")
            key_role = gr.Radio(["user", "admin"], value="user", label="Role")
            key_days = gr.Number(label="Expires in days (empty: never)", value=None, precision=0)
        create_key_btn = gr.Button("Create key", variant="primary", elem_id="admin-create-key")
        new_key = gr.Textbox(label="The new key: copy it now, it is not shown again",
                             interactive=False, visible=False, elem_id="admin-new-key",
                             buttons=["copy"])  # fmt: skip
        with gr.Row():
            pick_key = gr.Dropdown(label="Key", choices=[], scale=3)
            revoke_btn = gr.Button("Revoke", variant="stop")
        gr.Markdown("### Usage")
        usage = gr.Dataframe(headers=USAGE_HEADERS, value=[], interactive=False,
                             elem_id="admin-usage")  # fmt: skip
        gr.Markdown("### Audit log")
        verification = gr.Markdown("", elem_id="admin-audit-status")
        audit = gr.Dataframe(headers=AUDIT_HEADERS, value=[], interactive=False, wrap=True,
                             elem_id="admin-audit")  # fmt: skip
        refresh_btn = gr.Button("Refresh", size="sm")

    async def refresh(session):
        if not is_admin(session):
            return [gr.skip()] * 7
        token = token_of(session)
        try:
            user_list = await ctx.client.users(token)
            key_list = await ctx.client.keys(token)
            use = await ctx.client.usage(token)
            log = await ctx.client.audit(token, 50)
        except GatewayError as exc:
            return [gr.skip()] * 5 + [f"Not available: {exc}", gr.skip()]
        check = log["verification"]
        status = (
            f"Audit log intact: {check['entries']} entries."
            if check["ok"]
            else f"**Audit log TAMPERED** at line {check['line']}: {check['problem']}"
        )
        return [
            [[u["user"], u["role"], ",".join(u["groups"]), u["created_at"],
              "yes" if u["disabled"] else ""] for u in user_list],
            gr.Dropdown(choices=[u["user"] for u in user_list]),
            [[k["key_id"], k["user"], k["role"], k["created_at"], k["expires_at"] or "never",
              k["revoked_at"] or ""] for k in key_list],
            gr.Dropdown(choices=[k["key_id"] for k in key_list if not k["revoked_at"]]),
            [[u["kind"], u["name"], u["requests_last_minute"], u["tokens_today"],
              u["streams_open"], _limits(u["limits"])] for u in use],
            status,
            [[e["seq"], e["time"], e["actor"], e["action"], e["target"],
              " ".join(f"{k}={v}" for k, v in e["detail"].items())] for e in log["entries"]],
        ]  # fmt: skip

    shown = [users, pick_user, keys, pick_key, usage, verification, audit]
    refresh_btn.click(refresh, [ctx.session], shown)

    async def add_user(session, name, password, role, groups):
        await gateway(ctx.client.add_user(token_of(session), name.strip(), password, role,
                                          render.split_names(groups)))  # fmt: skip
        gr.Info(f"User {name.strip()} added.")
        return "", ""

    add_user_btn.click(add_user, [ctx.session, new_user, new_password, new_role, new_groups],
                       [new_user, new_password]).then(refresh, [ctx.session], shown)  # fmt: skip

    async def set_enabled(session, name, enabled):
        if not name:
            gr.Warning("Choose a user.")
            return
        await gateway(ctx.client.set_user_enabled(token_of(session), name, enabled))
        gr.Info(f"{name} {'enabled' if enabled else 'disabled'}.")

    async def disable(session, name):
        await set_enabled(session, name, False)

    async def enable(session, name):
        await set_enabled(session, name, True)

    for button, fn in ((disable_btn, disable), (enable_btn, enable)):
        button.click(fn, [ctx.session, pick_user], None).then(refresh, [ctx.session], shown)

    async def create_key(session, user, role, days):
        if not user.strip():
            gr.Warning("Name the user the key is for.")
            return gr.skip()
        made = await gateway(ctx.client.create_key(token_of(session), user.strip(), role,
                                                   days or None))  # fmt: skip
        return gr.Textbox(value=made["key"], visible=True)

    create_key_btn.click(create_key, [ctx.session, key_user, key_role, key_days],
                         [new_key]).then(refresh, [ctx.session], shown)  # fmt: skip

    async def revoke(session, key_id):
        if not key_id:
            gr.Warning("Choose a key.")
            return
        await gateway(ctx.client.revoke_key(token_of(session), key_id))
        gr.Info(f"Key {key_id} revoked.")

    revoke_btn.click(revoke, [ctx.session, pick_key], None).then(refresh, [ctx.session], shown)

    def show(session):
        admin = is_admin(session)
        return (
            gr.Markdown(visible=not admin),
            gr.Column(visible=admin),
            gr.Textbox(value="", visible=False),
        )

    def on_sign_in(dep):
        return dep.then(show, [ctx.session], [note, body, new_key]).then(
            refresh, [ctx.session], shown
        )

    return AdminView(on_sign_in)
