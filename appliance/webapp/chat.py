"""The Chat tab: model picker with states, streamed answers with stop, regenerate and edit,
system prompt and sampling settings, knowledge bases with citations, and the user's
conversations (kept in the browser; on the appliance only if the user turns saving on)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from appliance.webapp import conversations as conv
from appliance.webapp import render
from appliance.webapp.client import ChatEvent, GatewayError
from appliance.webapp.context import WebContext, bind, gateway, signed_in, token_of

# How often the start-up note's clock moves while a model starts.
_TICK_S = 1.0
SAVE_INFO = (
    "Off (default): conversations stay in this browser only. On: they are also kept on the "
    "appliance, for you alone; turning it off again deletes those copies."
)
# The browser downloads the export itself: nothing is written on the server.
_DOWNLOAD_JS = """(text) => {
  if (!text) return;
  const blob = new Blob([text], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "conversations.json";
  document.body.appendChild(a); a.click(); a.remove();
}"""


def _note(title: str, content: str = "", status: str | None = None, **meta: Any) -> dict[str, Any]:
    """A box in the chat that is not part of the conversation with the model. Boxes without a
    status are shown open (sources, errors); "done" ones closed, "pending" ones with a spinner."""
    metadata = {"title": title, **meta}
    if status:
        metadata["status"] = status
    return {"role": "assistant", "content": content, "metadata": metadata}


class AnswerStream:
    """Turns the events of one streamed answer into the messages the chat shows: a start-up
    note while a model starts, the answer, the sources, and an error note if it broke."""

    def __init__(self, model: str):
        self.model = model
        self.started = time.monotonic()
        self.waiting: list[str] = []
        self.ready_after: float | None = None
        self.answer = ""
        self.sources: dict[str, Any] | None = None
        self.error: str | None = None
        self.finish_reason: str | None = None

    def apply(self, event: ChatEvent) -> None:
        if event.kind == "waiting":
            self.waiting.append(event.text)
        elif event.kind == "delta":
            if self.waiting and self.ready_after is None:
                self.ready_after = time.monotonic() - self.started
            self.answer += event.text
            self.finish_reason = event.data.get("finish_reason") or self.finish_reason
        elif event.kind == "citations":
            self.sources = event.data
        elif event.kind == "error":
            self.error = event.text

    def messages(self) -> list[dict[str, Any]]:
        out = []
        if self.waiting:
            if self.ready_after is None and self.error is None:
                elapsed = time.monotonic() - self.started
                title = f"Starting {self.model}: {elapsed:.0f} s"
                out.append(_note(title, "\n".join(self.waiting[-3:]), "pending"))
            else:
                took = self.ready_after or time.monotonic() - self.started
                title = f"Started {self.model} in {took:.0f} s"
                lines = "\n".join(self.waiting[-3:])
                out.append(_note(title, lines, "done", duration=round(took, 1)))
        if self.answer or not (self.waiting or self.error):
            out.append({"role": "assistant", "content": self.answer})
        if self.finish_reason == "length":
            out.append(_note("The answer reached the max tokens limit: raise it in Settings"))
        if self.sources and render.citations_title(self.sources):
            title = render.citations_title(self.sources)
            out.append(_note(title, render.citations_markdown(self.sources)))
        if self.error:
            out.append(_note("The answer broke off", self.error))
        return out


@dataclass
class ChatView:
    """What the app wires to sign-in and sign-out: refresh the tab for the signed-in user."""

    on_sign_in: Callable[[Any], Any]


@dataclass
class ChatComponents:
    """The Chat tab's components: the conversation list, the pickers, the chat and its settings."""

    current: gr.State
    new_btn: gr.Button
    conversation_list: gr.Radio
    save_on_server: gr.Checkbox
    export_btn: gr.Button
    delete_btn: gr.Button
    delete_all_btn: gr.Button
    export_text: gr.Textbox
    model: gr.Dropdown
    kbs: gr.Dropdown
    model_status: gr.Markdown
    chatbot: gr.Chatbot
    message: gr.Textbox
    send_btn: gr.Button
    stop_btn: gr.Button
    system_prompt: gr.Textbox
    temperature: gr.Slider
    max_tokens: gr.Slider
    timer: gr.Timer


def chat_components() -> ChatComponents:
    current = gr.State(conv.new_conversation())
    with gr.Row(equal_height=False, elem_id="chat-row"):
        with gr.Column(scale=1, min_width=220, elem_id="conversations"):
            new_btn = gr.Button("New chat", variant="secondary", elem_id="new-chat")
            conversation_list = gr.Radio(
                label="Your conversations", choices=[], elem_id="conversation-list"
            )
            save_on_server = gr.Checkbox(
                label="Keep my conversations on the appliance", value=False, info=SAVE_INFO
            )
            with gr.Row():
                export_btn = gr.Button("Export", size="sm", elem_id="export")
                delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-chat")
            delete_all_btn = gr.Button("Delete all my conversations", size="sm", variant="stop")
            export_text = gr.Textbox(visible="hidden", elem_id="export-text")
        with gr.Column(scale=4, min_width=320):
            with gr.Row():
                model = gr.Dropdown(
                    label="Model", choices=[], elem_id="model-picker", scale=2, min_width=240
                )
                kbs = gr.Dropdown(
                    label="Answer from knowledge bases",
                    choices=[],
                    multiselect=True,
                    elem_id="kb-picker",
                    scale=3,
                    min_width=240,
                )
            model_status = gr.Markdown("", elem_id="model-status")
            chatbot = gr.Chatbot(
                label="Chat",
                elem_id="chatbot",
                height="60vh",
                editable="user",
                buttons=["copy", "copy_all"],
                placeholder="Pick a model and ask something.",
                feedback_options=None,
            )
            with gr.Row():
                message = gr.Textbox(
                    show_label=False,
                    placeholder="Message (Enter sends, Shift+Enter for a new line)",
                    lines=1,
                    max_lines=8,
                    scale=6,
                    elem_id="message",
                )
                send_btn = gr.Button(
                    "Send", variant="primary", scale=1, min_width=80, elem_id="send"
                )
                stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
            with gr.Accordion("Settings", open=False, elem_id="chat-settings"):
                system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt")
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                    max_tokens = gr.Slider(
                        1, 4096, value=512, step=1, label="Max tokens", elem_id="max-tokens"
                    )
    timer = gr.Timer(5.0)
    return ChatComponents(
        current,
        new_btn,
        conversation_list,
        save_on_server,
        export_btn,
        delete_btn,
        delete_all_btn,
        export_text,
        model,
        kbs,
        model_status,
        chatbot,
        message,
        send_btn,
        stop_btn,
        system_prompt,
        temperature,
        max_tokens,
        timer,
    )


# ----- models and knowledge bases in the pickers ----------------------------------------------


async def refresh_pickers(ctx: WebContext, session, chosen, chosen_kbs):
    """The pickers' choices and the chosen model's state line."""
    if not signed_in(session):
        return gr.skip(), gr.skip(), gr.skip()
    token = token_of(session)
    try:
        models = await ctx.client.models(token)
        bases = await ctx.client.knowledge_bases(token)
    except GatewayError:
        return gr.skip(), gr.skip(), gr.skip()
    choices = render.model_choices(models)
    names = [value for _, value in choices]
    # The values are set only when they must change: this runs on a timer, and its inputs may
    # be older than a choice the user made meanwhile, which must not be undone.
    model_update = gr.Dropdown(choices=choices)
    if chosen not in names:
        chosen = next((m["id"] for m in models if m.get("state") == "running"), None) or (
            names[0] if names else None
        )
        model_update = gr.Dropdown(choices=choices, value=chosen)
    kb_names = [render.kb_ref(kb, session.get("user")) for kb in bases]
    kb_update = gr.Dropdown(choices=kb_names)
    if any(k not in kb_names for k in chosen_kbs or []):
        kb_update = gr.Dropdown(choices=kb_names, value=[k for k in chosen_kbs if k in kb_names])
    state = next((m for m in models if m["id"] == chosen), None)
    status = "" if state is None else _status_line(state)
    return model_update, kb_update, status


async def pick_model(ctx: WebContext, session, chosen):
    """Picking a stopped model starts it; the status line follows it until it runs."""
    if not chosen or not signed_in(session):
        return
    token = token_of(session)
    entry = await gateway(ctx.client.warm(token, chosen))
    started = time.monotonic()
    deadline = started + ctx.settings.gateway.start_timeout_s
    while entry.get("state") == "starting" and time.monotonic() < deadline:
        yield f"◐ Starting **{chosen}**: {time.monotonic() - started:.0f} s"
        await asyncio.sleep(1.0)
        try:
            entry = next(m for m in await ctx.client.models(token) if m["id"] == chosen)
        except (GatewayError, StopIteration):
            break
    yield _status_line(entry)


# ----- answering ------------------------------------------------------------------------------


def chat_request(history, model_name, kb_names, system, temp, max_toks) -> dict[str, Any]:
    """The chat completion asked for: the conversation, the settings, the knowledge bases."""
    body = {
        "model": model_name,
        "messages": conv.api_messages(history, system or ""),
        "temperature": float(temp),
        "max_tokens": int(max_toks),
    }
    if kb_names:
        body["knowledge_bases"] = list(kb_names)
    return body


async def answer(ctx: WebContext, history, session, model_name, kb_names, system, temp, max_toks):
    """Stream the model's answer to the chat so far."""
    history = conv.plain_messages(history or [])
    if not model_name:
        yield [*history, _note("Pick a model first", "Choose one in the Model list above.")]
        return
    token = token_of(session)
    body = chat_request(history, model_name, kb_names, system, temp, max_toks)
    stream = AnswerStream(model_name)
    events: asyncio.Queue[ChatEvent | None] = asyncio.Queue()

    async def pump():
        try:
            async for event in ctx.client.chat_stream(token, body):
                await events.put(event)
        finally:
            await events.put(None)

    task = asyncio.create_task(pump())
    try:
        yield [*history, *stream.messages()]
        while True:
            try:
                event = await asyncio.wait_for(events.get(), _TICK_S)
            except TimeoutError:
                if stream.waiting and stream.ready_after is None:
                    yield [*history, *stream.messages()]  # the start-up clock moves
                continue
            if event is None:
                break
            first_words = event.kind == "delta" and not stream.answer
            stream.apply(event)
            # Deltas can come faster than a browser repaints: show them when the queue is
            # empty, but the first words at once, however fast the rest follows.
            if events.empty() or (first_words and stream.answer):
                yield [*history, *stream.messages()]
        yield [*history, *stream.messages()]
    finally:
        # Stop (or a closed page) cancels this generator: closing the stream makes the
        # gateway abort the request on its instance.
        task.cancel()


def add_user_message(text, history):
    if not text.strip():
        raise gr.Error("Type a message first.", duration=3)
    return "", [*conv.plain_messages(history or []), {"role": "user", "content": text}]


def before_retry(history):
    history = conv.plain_messages(history or [])
    last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None)
    if last_user is None:
        raise gr.Error("Nothing to regenerate.", duration=3)
    return history[: last_user + 1]


def before_edit(history, edit: gr.EditData):
    history = conv.plain_messages(history or [])
    return [*history[: edit.index], {"role": "user", "content": edit.value}]


def stopped(history):
    """A start-up box left spinning by Stop says it was stopped."""
    history = conv.plain_messages(history or [])
    for m in history:
        if (m.get("metadata") or {}).get("status") == "pending":
            m["metadata"] = {"title": "Stopped while the model was starting", "status": "done"}
    return history


def undo(history):
    history = conv.plain_messages(history or [])
    last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None)
    if last_user is None:
        return history, ""
    return history[:last_user], history[last_user]["content"]


async def save(
    ctx: WebContext, history, current_conv, store, session, model_name, kb_names, system
):
    """Keep the conversation in the browser (and on the appliance if the user wants)."""
    if not signed_in(session):
        return gr.skip(), gr.skip(), gr.skip()
    user = session["user"]
    messages = conv.plain_messages(history or [])
    if not messages:
        return gr.skip(), gr.skip(), gr.skip()
    updated = {
        **current_conv,
        "messages": messages,
        "title": conv.title_for(messages),
        "model": model_name,
        "knowledge_bases": list(kb_names or []),
        "system_prompt": system or "",
        "updated_at": conv.now(),
    }
    store = conv.upsert(store, user, updated, ctx.settings.webapp.max_conversations)
    if conv.save_on_server(store, user):
        try:
            await ctx.client.save_conversation(token_of(session), updated)
        except GatewayError as exc:
            gr.Warning(f"Not saved on the appliance: {exc}")
    return store, updated, _list_update(store, user, updated["id"])


# ----- conversations --------------------------------------------------------------------------


def new_chat(session):
    return conv.new_conversation(), [], gr.Radio(value=None)


def open_conversation(conversation_id, store, session):
    if not signed_in(session):
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    mine = conv.user_conversations(store, session["user"])
    found = next((c for c in mine if c["id"] == conversation_id), None)
    if found is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    return (
        found,
        found.get("messages", []),
        gr.Dropdown(value=found.get("model")),
        gr.Dropdown(value=found.get("knowledge_bases") or []),
        found.get("system_prompt", ""),
    )


async def delete_current(ctx: WebContext, current_conv, store, session):
    user = session["user"]
    store = conv.remove(store, user, current_conv["id"])
    if conv.save_on_server(store, user):
        await gateway(ctx.client.delete_saved_conversation(token_of(session), current_conv["id"]))
    return store, conv.new_conversation(), [], _list_update(store, user, None)


async def delete_all(ctx: WebContext, store, session):
    user = session["user"]
    store = conv.remove(store, user, None)
    await gateway(ctx.client.delete_saved_conversation(token_of(session), None))
    gr.Info("Your conversations are deleted, here and on the appliance.")
    return store, conv.new_conversation(), [], _list_update(store, user, None)


async def toggle_saving(ctx: WebContext, on, store, session):
    user = session["user"]
    token = token_of(session)
    store = conv.set_save_on_server(store, user, on)
    if on:
        for c in conv.user_conversations(store, user):
            await gateway(ctx.client.save_conversation(token, c))
        gr.Info("Your conversations are now also kept on the appliance.")
    else:
        await gateway(ctx.client.delete_saved_conversation(token, None))
        gr.Info("Conversations stay in this browser only; the appliance's copies are deleted.")
    return store


async def export(ctx: WebContext, store, session):
    user = session["user"]
    local = conv.user_conversations(store, user)
    if conv.save_on_server(store, user):
        local = conv.merge(local, await gateway(ctx.client.saved_conversations(token_of(session))))
    return conv.export_json(user, local)


async def refresh_conversations(ctx: WebContext, session, store):
    """After sign-in: this user's conversations (and saving choice), a fresh chat."""
    if not signed_in(session):
        return conv.new_conversation(), [], gr.Radio(choices=[], value=None), False, store
    user = session["user"]
    if conv.save_on_server(store, user):
        try:
            saved = await ctx.client.saved_conversations(token_of(session))
        except GatewayError as exc:
            gr.Warning(f"Your saved conversations could not be loaded: {exc}")
        else:
            merged = conv.merge(conv.user_conversations(store, user), saved)
            limit = ctx.settings.webapp.max_conversations
            store = conv.with_conversations(store, user, merged, limit)
    return (
        conv.new_conversation(),
        [],
        _list_update(store, user, None),
        conv.save_on_server(store, user),
        store,
    )


# ----- wiring ---------------------------------------------------------------------------------


def build_chat(ctx: WebContext) -> ChatView:
    return wire_chat(ctx, chat_components())


def wire_chat(ctx: WebContext, c: ChatComponents) -> ChatView:
    """Connect the tab's components to its handlers."""
    pickers = [c.model, c.kbs, c.model_status]
    picker_inputs = [ctx.session, c.model, c.kbs]
    chat_out = [ctx.store, c.current, c.chatbot, c.conversation_list]
    settings = [c.system_prompt, c.temperature, c.max_tokens]
    answer_inputs = [c.chatbot, ctx.session, c.model, c.kbs, *settings]
    save_args = dict(
        fn=bind(ctx, save),
        inputs=[c.chatbot, c.current, ctx.store, ctx.session, c.model, c.kbs, c.system_prompt],
        outputs=[ctx.store, c.current, c.conversation_list],
    )
    picker_args = dict(
        fn=bind(ctx, refresh_pickers), inputs=picker_inputs, outputs=pickers, show_progress="hidden"
    )
    quiet = {"show_progress": "hidden"}
    sent = gr.on(
        [c.send_btn.click, c.message.submit],
        add_user_message,
        [c.message, c.chatbot],
        [c.message, c.chatbot],
        **quiet,
    )
    # .success: no answer is asked for when the message was refused (e.g. empty).
    respond = dict(fn=bind(ctx, answer), inputs=answer_inputs, outputs=c.chatbot)
    answering = [
        sent.success(**respond),
        c.chatbot.retry(before_retry, c.chatbot, c.chatbot, **quiet).success(**respond),
        c.chatbot.edit(before_edit, c.chatbot, c.chatbot, **quiet).success(**respond),
    ]
    for event in answering:
        # The model's state line catches up at once (it may have just started).
        event.then(**save_args).then(**picker_args)
    c.chatbot.undo(undo, c.chatbot, [c.chatbot, c.message]).then(**save_args)
    # Stop cancels the answer (keeping what came so far) and saves the conversation as it is.
    c.stop_btn.click(stopped, c.chatbot, c.chatbot, cancels=answering, **quiet).then(**save_args)

    c.new_btn.click(new_chat, [ctx.session], [c.current, c.chatbot, c.conversation_list])
    c.conversation_list.input(
        open_conversation,
        [c.conversation_list, ctx.store, ctx.session],
        [c.current, c.chatbot, c.model, c.kbs, c.system_prompt],
    )
    c.delete_btn.click(bind(ctx, delete_current), [c.current, ctx.store, ctx.session], chat_out)
    c.delete_all_btn.click(bind(ctx, delete_all), [ctx.store, ctx.session], chat_out)
    c.save_on_server.input(
        bind(ctx, toggle_saving), [c.save_on_server, ctx.store, ctx.session], [ctx.store]
    )
    c.export_btn.click(bind(ctx, export), [ctx.store, ctx.session], [c.export_text]).then(
        None, [c.export_text], None, js=_DOWNLOAD_JS
    )

    c.timer.tick(**picker_args)
    c.model.input(bind(ctx, pick_model), [ctx.session, c.model], [c.model_status], **quiet)

    def on_sign_in(dep):
        return dep.then(
            bind(ctx, refresh_conversations),
            [ctx.session, ctx.store],
            [c.current, c.chatbot, c.conversation_list, c.save_on_server, ctx.store],
        ).then(bind(ctx, refresh_pickers), picker_inputs, pickers)

    return ChatView(on_sign_in)


def _status_line(model: dict[str, Any]) -> str:
    state = model.get("state")
    if not model.get("installed", True):
        return f"**{model['id']}** is not installed on this appliance."
    if state == "running":
        return f"● **{model['id']}** is running."
    if state == "starting":
        return f"◐ **{model['id']}** is starting."
    return f"○ **{model['id']}** is stopped; it starts when you send a message."


def _list_update(store, user: str, selected: str | None) -> gr.Radio:
    items = conv.user_conversations(store, user)
    return gr.Radio(choices=[(c.get("title", "Chat"), c["id"]) for c in items], value=selected)
