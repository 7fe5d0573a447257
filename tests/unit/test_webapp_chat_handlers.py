"""The Chat tab's handlers without a browser: the pickers, answering, and the conversations the
browser keeps (and the appliance, when the user turns saving on)."""

from __future__ import annotations

import json

import gradio as gr
import pytest

from appliance.webapp import chat
from appliance.webapp import conversations as conv
from appliance.webapp.client import ChatEvent, GatewayError
from tests.unit.webapp_fakes import ADMIN, REFUSED, FakeClient, context, given, run

MODELS = [
    {"id": "a", "kind": "chat", "state": "stopped", "installed": True},
    {"id": "b", "kind": "chat", "state": "running", "installed": True},
]
BASES = [{"name": "plant"}]


def test_pickers_choose_a_running_model_and_drop_gone_knowledge_bases():
    ctx = context(FakeClient(models=MODELS, knowledge_bases=BASES))
    model, kbs, status = run(chat.refresh_pickers(ctx, ADMIN, "gone", ["plant", "old"]))
    assert given(model)["value"] == "b"
    assert given(kbs) == {"choices": ["plant"], "value": ["plant"]}
    assert status == "● **b** is running."


def test_pickers_keep_the_users_choice_while_it_is_still_there():
    ctx = context(FakeClient(models=MODELS, knowledge_bases=BASES))
    model, kbs, status = run(chat.refresh_pickers(ctx, ADMIN, "a", ["plant"]))
    assert "value" not in given(model) and "value" not in given(kbs)  # not undone by a tick
    assert "stopped" in status


def test_pickers_stay_as_they_are_when_signed_out_or_the_gateway_refuses():
    skip = gr.skip()
    assert run(chat.refresh_pickers(context(FakeClient()), {}, None, [])) == (skip, skip, skip)
    ctx = context(FakeClient(models=REFUSED))
    assert run(chat.refresh_pickers(ctx, ADMIN, None, [])) == (skip, skip, skip)


def test_the_answer_streams_with_the_settings_and_knowledge_bases():
    events = [ChatEvent("waiting", "starting a"), ChatEvent("delta", "Hi"), ChatEvent("done")]
    client = FakeClient(chat_stream=events)
    history = [{"role": "user", "content": "Hello"}]
    shown = run(chat.answer(context(client), history, ADMIN, "a", ["plant"], "Be brief.", 0.5, 9))
    ((token, body),) = client.called("chat_stream")
    assert token == "t-alice"
    assert body["knowledge_bases"] == ["plant"] and body["max_tokens"] == 9
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    last = shown[-1]
    assert last[0] == {"role": "user", "content": "Hello"}
    assert last[1]["metadata"]["status"] == "done"  # the start-up box closes
    assert last[2] == {"role": "assistant", "content": "Hi"}


def test_without_a_model_the_chat_says_to_pick_one():
    shown = run(chat.answer(context(FakeClient()), [], ADMIN, None, [], "", 0.7, 512))
    assert shown == [[chat._note("Pick a model first", "Choose one in the Model list above.")]]


def test_messages_retry_edit_undo_and_stop():
    assert chat.add_user_message("Hi", []) == ("", [{"role": "user", "content": "Hi"}])
    with pytest.raises(gr.Error):
        chat.add_user_message("  ", [])
    history = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert chat.before_retry(history) == history[:1]
    with pytest.raises(gr.Error):
        chat.before_retry([])
    assert chat.undo(history) == ([], "Q")
    pending = [chat._note("Starting a: 3 s", "log", "pending")]
    assert chat.stopped(pending)[0]["metadata"]["title"] == "Stopped while the model was starting"


def test_save_keeps_the_conversation_and_warns_when_the_appliance_refuses():
    store = conv.set_save_on_server({}, "alice", True)
    current = conv.new_conversation()
    history = [{"role": "user", "content": "Hello there"}]
    client = FakeClient(save_conversation=REFUSED)
    with pytest.warns(UserWarning, match="Not saved on the appliance"):
        store, updated, listed = run(
            chat.save(context(client), history, current, store, ADMIN, "a", ["plant"], "")
        )
    assert updated["title"] == "Hello there" and updated["knowledge_bases"] == ["plant"]
    assert conv.user_conversations(store, "alice") == [updated]
    assert given(listed)["value"] == updated["id"]


def test_saving_on_the_appliance_turns_on_and_off():
    first = conv.new_conversation()
    store = conv.upsert({}, "alice", first, limit=10)
    client = FakeClient()
    store = run(chat.toggle_saving(context(client), True, store, ADMIN))
    assert conv.save_on_server(store, "alice")
    assert client.called("save_conversation") == [("t-alice", first)]
    store = run(chat.toggle_saving(context(client), False, store, ADMIN))
    assert client.called("delete_saved_conversation") == [("t-alice", None)]
    assert not conv.save_on_server(store, "alice")


def test_export_merges_the_appliances_copies_and_refusals_become_messages():
    mine = {**conv.new_conversation(), "title": "here"}
    theirs = {**conv.new_conversation(), "title": "there"}
    store = conv.set_save_on_server(conv.upsert({}, "alice", mine, limit=10), "alice", True)
    client = FakeClient(saved_conversations=[theirs])
    exported = json.loads(run(chat.export(context(client), store, ADMIN)))
    assert {c["title"] for c in exported["conversations"]} == {"here", "there"}
    expired = context(FakeClient(saved_conversations=GatewayError(401, "expired")))
    with pytest.raises(gr.Error, match="Sign out and in again"):
        run(chat.export(expired, store, ADMIN))


def test_deleting_and_opening_conversations():
    first = {**conv.new_conversation(), "model": "a", "system_prompt": "Be brief."}
    store = conv.upsert({}, "alice", first, limit=10)
    found, _, model, _, system = chat.open_conversation(first["id"], store, ADMIN)
    assert found == first and given(model) == {"value": "a"} and system == "Be brief."
    assert chat.open_conversation("other", store, ADMIN)[0] == gr.skip()
    client = FakeClient()
    store, _, shown, _ = run(chat.delete_current(context(client), first, store, ADMIN))
    assert conv.user_conversations(store, "alice") == [] and shown == []
    assert client.called("delete_saved_conversation") == []  # saving there is off


def test_sign_in_loads_the_appliances_conversations_or_warns():
    saved = {**conv.new_conversation(), "title": "kept"}
    store = conv.set_save_on_server({}, "alice", True)
    ctx = context(FakeClient(saved_conversations=[saved]))
    _, _, listed, saving, store = run(chat.refresh_conversations(ctx, ADMIN, store))
    assert saving and given(listed)["choices"] == [("kept", saved["id"])]
    broken = context(FakeClient(saved_conversations=REFUSED))
    with pytest.warns(UserWarning, match="could not be loaded"):
        run(chat.refresh_conversations(broken, ADMIN, store))


def test_picking_a_running_model_shows_its_state():
    ctx = context(FakeClient(warm={"id": "b", "state": "running"}))
    assert run(chat.pick_model(ctx, ADMIN, "b")) == ["● **b** is running."]
    assert run(chat.pick_model(ctx, {}, "b")) == []
