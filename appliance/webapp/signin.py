"""Signing in (username and password, or an API key), checking the sign-in a browser kept, and
signing out."""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass

import gradio as gr

from appliance.webapp.client import GatewayError
from appliance.webapp.context import Session, WebContext, signed_in


def session_of(account: dict) -> Session:
    """What the browser keeps of a signed-in account."""
    keep = ("token", "user", "role", "groups", "single_user", "expires_at", "kind")
    return {k: account.get(k) for k in keep}


@dataclass
class SignInView:
    """The sign-in form; shown while nobody is signed in."""

    column: gr.Column
    message: gr.Markdown
    password_event: object
    key_event: object


def build_signin(ctx: WebContext) -> SignInView:
    with gr.Column(visible=False, elem_id="sign-in", elem_classes=["sign-in"]) as column:
        gr.Markdown("### Sign in")
        oidc = ctx.settings.identity.oidc
        if "oidc" in ctx.settings.identity.sources:
            # A plain link: the browser leaves the page for the provider and comes back.
            name = html.escape(oidc.display_name)
            gr.HTML(f'<a href="/oidc/login" id="oidc-sign-in">Sign in with {name}</a>')
        with gr.Tabs():
            # Only where some source takes passwords (local accounts, LDAP).
            passwords = bool({"local", "ldap"} & set(ctx.settings.identity.sources))
            with gr.Tab("Username and password", visible=passwords):
                username = gr.Textbox(label="Username", autofocus=True, max_lines=1)
                password = gr.Textbox(label="Password", type="password", max_lines=1)
                password_btn = gr.Button("Sign in", variant="primary", elem_id="sign-in-button")
            with gr.Tab("API key"):
                api_key = gr.Textbox(label="API key", type="password", max_lines=1)
                key_btn = gr.Button("Sign in with the key", variant="primary")
        message = gr.Markdown("", elem_id="sign-in-message")

    async def with_password(user: str, secret: str):
        if not user.strip() or not secret:
            return gr.skip(), "Enter your username and password.", secret
        try:
            account = await ctx.client.sign_in(user.strip(), secret)
        except GatewayError as exc:
            return gr.skip(), f"**Not signed in:** {exc}", ""
        return session_of(account), "", ""

    async def with_key(key: str):
        if not key.strip():
            return gr.skip(), "Paste an API key.", ""
        try:
            account = await ctx.client.sign_in_with_key(key.strip())
        except GatewayError as exc:
            return gr.skip(), f"**Not signed in:** {exc}", ""
        return session_of(account), "", ""

    outs = [ctx.session, message]
    password_event = gr.on(
        [password_btn.click, password.submit],
        with_password,
        [username, password],
        [*outs, password],
    )
    key_event = gr.on([key_btn.click, api_key.submit], with_key, [api_key], [*outs, api_key])
    return SignInView(column, message, password_event, key_event)


async def check_session(ctx: WebContext, session: Session | None) -> Session:
    """The browser's kept sign-in if the gateway still accepts it; in single-user mode the local
    administrator; otherwise nobody."""
    token = (session or {}).get("token") or None
    try:
        account = await ctx.client.me(token)
    except GatewayError as exc:
        if exc.status in (401, 403):
            return {}
        gr.Warning(f"The gateway cannot be reached: {exc}")
        return session or {}
    if token is None and not account.get("single_user"):
        return {}
    return session_of({**account, "token": token or ""})


async def sign_out(ctx: WebContext, session: Session | None) -> Session:
    if signed_in(session) and session.get("token"):
        with contextlib.suppress(GatewayError):  # an expired session is as good as ended
            await ctx.client.sign_out(session["token"])
    return {}
