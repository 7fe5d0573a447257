"""The Admin tab (administrators): users, API keys (a new key is shown once), everyone's usage
against their limits, and the audit log with its verification."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from appliance.webapp import render
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, bind, gateway, is_admin, token_of

USER_HEADERS = ["User", "Role", "Groups", "Created", "Disabled"]
KEY_HEADERS = ["Key id", "User", "Role", "Created", "Expires", "Revoked"]
USAGE_HEADERS = ["Kind", "Name", "Requests (last minute)", "Tokens today", "Streams open", "Limits"]
AUDIT_HEADERS = ["#", "Time", "Actor", "Action", "Target", "Details"]


def _limits(limits: dict[str, Any]) -> str:
    shown = [f"{k.replace('_', ' ')} {v}" for k, v in limits.items() if v is not None]
    return ", ".join(shown) or "none"


def user_rows(users: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            u["user"],
            u["role"],
            ",".join(u["groups"]),
            u["created_at"],
            "yes" if u["disabled"] else "",
        ]
        for u in users
    ]


def key_rows(keys: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            k["key_id"],
            k["user"],
            k["role"],
            k["created_at"],
            k["expires_at"] or "never",
            k["revoked_at"] or "",
        ]
        for k in keys
    ]


def usage_rows(usage: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            u["kind"],
            u["name"],
            u["requests_last_minute"],
            u["tokens_today"],
            u["streams_open"],
            _limits(u["limits"]),
        ]
        for u in usage
    ]


def audit_rows(entries: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            e["seq"],
            e["time"],
            e["actor"],
            e["action"],
            e["target"],
            " ".join(f"{k}={v}" for k, v in e["detail"].items()),
        ]
        for e in entries
    ]


def audit_status(check: dict[str, Any]) -> str:
    if check["ok"]:
        return f"Audit log intact: {check['entries']} entries."
    return f"**Audit log TAMPERED** at line {check['line']}: {check['problem']}"


@dataclass
class AdminView:
    """What the app wires to sign-in: show the tab's content to administrators."""

    on_sign_in: Callable[[Any], Any]


@dataclass
class AdminComponents:
    """The Admin tab's components: a note for non-administrators, and the body."""

    note: gr.Markdown
    body: gr.Column
    users: gr.Dataframe
    new_user: gr.Textbox
    new_password: gr.Textbox
    new_role: gr.Radio
    new_groups: gr.Textbox
    add_user_btn: gr.Button
    pick_user: gr.Dropdown
    disable_btn: gr.Button
    enable_btn: gr.Button
    keys: gr.Dataframe
    key_user: gr.Textbox
    key_role: gr.Radio
    key_days: gr.Number
    create_key_btn: gr.Button
    new_key: gr.Textbox
    pick_key: gr.Dropdown
    revoke_btn: gr.Button
    usage: gr.Dataframe
    verification: gr.Markdown
    audit: gr.Dataframe
    refresh_btn: gr.Button


def _table(headers: list[str], elem_id: str, **kw: Any) -> gr.Dataframe:
    return gr.Dataframe(headers=headers, value=[], interactive=False, elem_id=elem_id, **kw)


def admin_components() -> AdminComponents:
    note = gr.Markdown("Administration is for administrators.", elem_id="admin-note")
    with gr.Column(visible=False, elem_id="admin-body") as body:
        gr.Markdown("### Users")
        users = _table(USER_HEADERS, "admin-users")
        with gr.Row():
            new_user = gr.Textbox(label="User name", max_lines=1, elem_id="admin-new-user")
            new_password = gr.Textbox(
                label="Password (8 or more characters)",
                type="password",
                max_lines=1,
                elem_id="admin-new-password",
            )
            new_role = gr.Radio(["user", "admin"], value="user", label="Role")
            new_groups = gr.Textbox(label="Groups", max_lines=1)
        add_user_btn = gr.Button("Add user", variant="primary", elem_id="admin-add-user")
        with gr.Row():
            pick_user = gr.Dropdown(label="User", choices=[], scale=3)
            disable_btn = gr.Button("Disable (ends their keys and sessions)", variant="stop")
            enable_btn = gr.Button("Enable")
        gr.Markdown("### API keys")
        keys = _table(KEY_HEADERS, "admin-keys")
        with gr.Row():
            key_user = gr.Textbox(label="For user", max_lines=1, elem_id="admin-key-user")
            key_role = gr.Radio(["user", "admin"], value="user", label="Role")
            key_days = gr.Number(label="Expires in days (empty: never)", value=None, precision=0)
        create_key_btn = gr.Button("Create key", variant="primary", elem_id="admin-create-key")
        new_key = gr.Textbox(
            label="The new key: copy it now, it is not shown again",
            interactive=False,
            visible=False,
            elem_id="admin-new-key",
            buttons=["copy"],
        )
        with gr.Row():
            pick_key = gr.Dropdown(label="Key", choices=[], scale=3)
            revoke_btn = gr.Button("Revoke", variant="stop")
        gr.Markdown("### Usage")
        usage = _table(USAGE_HEADERS, "admin-usage")
        gr.Markdown("### Audit log")
        verification = gr.Markdown("", elem_id="admin-audit-status")
        audit = _table(AUDIT_HEADERS, "admin-audit", wrap=True)
        refresh_btn = gr.Button("Refresh", size="sm")
    return AdminComponents(
        note,
        body,
        users,
        new_user,
        new_password,
        new_role,
        new_groups,
        add_user_btn,
        pick_user,
        disable_btn,
        enable_btn,
        keys,
        key_user,
        key_role,
        key_days,
        create_key_btn,
        new_key,
        pick_key,
        revoke_btn,
        usage,
        verification,
        audit,
        refresh_btn,
    )


async def refresh(ctx: WebContext, session):
    """Users, keys, usage and the audit log, for administrators."""
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
    return [
        user_rows(user_list),
        gr.Dropdown(choices=[u["user"] for u in user_list]),
        key_rows(key_list),
        gr.Dropdown(choices=[k["key_id"] for k in key_list if not k["revoked_at"]]),
        usage_rows(use),
        audit_status(log["verification"]),
        audit_rows(log["entries"]),
    ]


async def add_user(ctx: WebContext, session, name, password, role, groups):
    name = name.strip()
    await gateway(
        ctx.client.add_user(token_of(session), name, password, role, render.split_names(groups))
    )
    gr.Info(f"User {name} added.")
    return "", ""


async def set_enabled(ctx: WebContext, session, name, enabled):
    if not name:
        gr.Warning("Choose a user.")
        return
    await gateway(ctx.client.set_user_enabled(token_of(session), name, enabled))
    gr.Info(f"{name} {'enabled' if enabled else 'disabled'}.")


async def disable(ctx: WebContext, session, name):
    await set_enabled(ctx, session, name, False)


async def enable(ctx: WebContext, session, name):
    await set_enabled(ctx, session, name, True)


async def create_key(ctx: WebContext, session, user, role, days):
    """A new key, shown once."""
    if not user.strip():
        gr.Warning("Name the user the key is for.")
        return gr.skip()
    made = await gateway(ctx.client.create_key(token_of(session), user.strip(), role, days or None))
    return gr.Textbox(value=made["key"], visible=True)


async def revoke(ctx: WebContext, session, key_id):
    if not key_id:
        gr.Warning("Choose a key.")
        return
    await gateway(ctx.client.revoke_key(token_of(session), key_id))
    gr.Info(f"Key {key_id} revoked.")


def show(session):
    """The body for administrators, the note for everyone else; a key shown before goes."""
    admin = is_admin(session)
    return (
        gr.Markdown(visible=not admin),
        gr.Column(visible=admin),
        gr.Textbox(value="", visible=False),
    )


def build_admin(ctx: WebContext) -> AdminView:
    return wire_admin(ctx, admin_components())


def wire_admin(ctx: WebContext, c: AdminComponents) -> AdminView:
    """Connect the tab's components to its handlers; every change shows the tab afresh."""
    shown = [c.users, c.pick_user, c.keys, c.pick_key, c.usage, c.verification, c.audit]
    again = dict(fn=bind(ctx, refresh), inputs=[ctx.session], outputs=shown)
    c.refresh_btn.click(**again)
    adding = [ctx.session, c.new_user, c.new_password, c.new_role, c.new_groups]
    c.add_user_btn.click(bind(ctx, add_user), adding, [c.new_user, c.new_password]).then(**again)
    for button, fn in ((c.disable_btn, disable), (c.enable_btn, enable)):
        button.click(bind(ctx, fn), [ctx.session, c.pick_user], None).then(**again)
    creating = [ctx.session, c.key_user, c.key_role, c.key_days]
    c.create_key_btn.click(bind(ctx, create_key), creating, [c.new_key]).then(**again)
    c.revoke_btn.click(bind(ctx, revoke), [ctx.session, c.pick_key], None).then(**again)

    def on_sign_in(dep):
        return dep.then(show, [ctx.session], [c.note, c.body, c.new_key]).then(**again)

    return AdminView(on_sign_in)
