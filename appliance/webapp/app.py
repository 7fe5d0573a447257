"""The web app's page: header, sign-in, and the Chat, Knowledge, Models, Training, Monitoring
and Admin tabs, wired so that signing in or out refreshes every tab for the user."""

from __future__ import annotations

import gradio as gr

from appliance.config import ApplianceSettings
from appliance.webapp.admin_view import build_admin
from appliance.webapp.chat import build_chat
from appliance.webapp.client import GatewayClient
from appliance.webapp.context import WebContext, is_admin, signed_in
from appliance.webapp.files_guard import SET_COOKIE_JS, ticket
from appliance.webapp.knowledge import build_knowledge
from appliance.webapp.models_view import build_models
from appliance.webapp.monitoring_view import build_monitoring
from appliance.webapp.oidc_sign_in import OidcSignIn
from appliance.webapp.signin import build_signin, check_session, session_of, sign_out
from appliance.webapp.training_view import build_training

# Readable on a laptop and a phone: no side margins on small screens, the chat fills the height.
CSS = """
.gradio-container { width: 100% !important; max-width: 1400px !important; margin: auto; }
#topbar { align-items: center; }
#who { text-align: right; }
.sign-in { max-width: 420px; margin: 2rem auto; }
#oidc-sign-in { display: block; padding: 0.6rem; border-radius: 8px; text-align: center;
  text-decoration: none; background: var(--button-primary-background-fill);
  color: var(--button-primary-text-color); }
@media (max-width: 640px) {
  .gradio-container { padding: 4px !important; }
  #chatbot { height: 55vh !important; }
  /* On a phone the chat comes first; the conversation list follows it. */
  #conversations { order: 2; }
}
"""


def build_app(
    settings: ApplianceSettings,
    client: GatewayClient,
    secret: str,
    oidc: OidcSignIn | None = None,
) -> gr.Blocks:
    """The Blocks app; `secret` encrypts what the browser keeps (sign-in, conversations);
    `oidc` hands over the sign-ins made through the OIDC provider."""
    title = settings.webapp.title
    # Cached uploads older than an hour go (they are also deleted right after use).
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        session = gr.BrowserState({}, storage_key="appliance-session", secret=secret)
        store = gr.BrowserState({}, storage_key="appliance-conversations", secret=secret)
        ctx = WebContext(settings, client, session, store)
        with gr.Row(elem_id="topbar"):
            gr.Markdown(f"## {title}", elem_id="title")
            who = gr.Markdown("", elem_id="who")
            sign_out_btn = gr.Button(
                "Sign out", size="sm", visible=False, elem_id="sign-out", scale=0, min_width=100
            )
        signin = build_signin(ctx)
        # The sign-in as the file endpoints see it (a cookie; see files_guard.py).
        files_ticket = gr.Textbox(visible=False, elem_id="files-ticket")
        with gr.Column(visible=False, elem_id="main") as main, gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = build_chat(ctx)
            with gr.Tab("Knowledge", id="knowledge", elem_id="tab-knowledge"):
                knowledge = build_knowledge(ctx)
            with gr.Tab("Models", id="models", elem_id="tab-models"):
                models = build_models(ctx)
            with gr.Tab("Training", id="training", elem_id="tab-training"):
                training = build_training(ctx)
            with gr.Tab("Monitoring", id="monitoring", elem_id="tab-monitoring"):
                monitoring = build_monitoring(ctx)
            with gr.Tab("Admin", id="admin", elem_id="tab-admin"):
                admin = build_admin(ctx)

        def show(session_value):
            on = signed_in(session_value)
            if not on:
                label = ""
            elif session_value.get("single_user"):
                label = "Single-user mode: no accounts are set up; you act as the administrator."
            else:
                role = " (administrator)" if is_admin(session_value) else ""
                label = f"Signed in as **{session_value['user']}**{role}"
            return (
                gr.Column(visible=not on),
                gr.Column(visible=on),
                label,
                gr.Button(visible=on and not session_value.get("single_user")),
            )

        shown = [signin.column, main, who, sign_out_btn]

        def after_session_change(dep):
            dep = dep.then(show, [session], shown)
            dep = dep.then(lambda s: ticket(secret, s), [session], [files_ticket])
            dep = dep.then(None, [files_ticket], None, js=SET_COOKIE_JS)
            for view in (chat, knowledge, models, training, monitoring, admin):
                dep = view.on_sign_in(dep)
            return dep

        async def restore(session_value, request: gr.Request):
            # Back from the provider: the callback's one-time code names the new sign-in.
            handed = oidc.take(request.query_params.get("signin")) if oidc else None
            return session_of(handed) if handed else await check_session(ctx, session_value)

        after_session_change(blocks.load(restore, [session], [session]))
        for event in (signin.password_event, signin.key_event):
            after_session_change(event)

        async def leave(session_value):
            return await sign_out(ctx, session_value)

        after_session_change(sign_out_btn.click(leave, [session], [session]))
    return blocks
