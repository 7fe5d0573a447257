"""The web app's logic without a browser: the chat stream parser, how an answer is shown, the
conversations the browser keeps, and what the tables show."""

from __future__ import annotations

import json

from appliance.webapp import conversations as conv
from appliance.webapp import render
from appliance.webapp.chat import AnswerStream
from appliance.webapp.client import ChatEvent, parse_sse_line

# Lines as the gateway sends them while a model starts and then answers over a knowledge base.
STREAM = [
    ": waiting for an instance of tiny-chat",
    "",
    ": still waiting for tiny-chat: starting",
    'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
    'data: {"choices":[{"index":0,"delta":{"content":"XK-4471 [1]"}}]}',
    'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    'data: {"object":"chat.completion.chunk","choices":[],"citations":[{"number":1,"document":"d",'
    '"filename":"pump.pdf","page":2,"sheet":null,"snippet":"part XK-4471","passage":"The part '
    'number is XK-4471."}],"sources":[]}',
    "data: [DONE]",
]


def test_stream_lines_become_events():
    events = [e for e in map(parse_sse_line, STREAM) if e is not None]
    kinds = [e.kind for e in events]
    assert kinds == ["waiting", "waiting", "delta", "delta", "delta", "citations", "done"]
    assert events[3].text == "XK-4471 [1]" and events[4].data["finish_reason"] == "stop"
    error = parse_sse_line(
        'data: {"error": {"message": "instance failed", "type": "server_error"}}'
    )
    assert error.kind == "error" and error.text == "instance failed"
    assert parse_sse_line("data: not json") is None


def test_answer_shows_start_up_answer_and_sources():
    stream = AnswerStream("tiny-chat")
    for event in filter(None, map(parse_sse_line, STREAM)):
        stream.apply(event)
    notes = stream.messages()
    assert notes[0]["metadata"]["title"].startswith("Started tiny-chat in")
    assert notes[0]["metadata"]["status"] == "done"  # closed once the model answers
    assert notes[1] == {"role": "assistant", "content": "XK-4471 [1]"}
    sources = notes[2]
    assert sources["metadata"] == {"title": "Sources cited (1)"}  # no status: shown open
    assert "pump.pdf, page 2" in sources["content"] and "The part number is" in sources["content"]


def test_a_broken_answer_keeps_what_came_and_says_why():
    stream = AnswerStream("m")
    stream.apply(ChatEvent("delta", "Half an ans"))
    stream.apply(ChatEvent("error", "the instance of m failed"))
    shown = stream.messages()
    assert shown[0]["content"] == "Half an ans"
    assert shown[1]["metadata"]["title"] == "The answer broke off"
    assert "failed" in shown[1]["content"]


def test_only_the_conversation_goes_to_the_model():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "metadata": None},
        {"role": "assistant", "content": "", "metadata": {"title": "Started m in 3 s"}},
        {"role": "assistant", "content": "Hello", "metadata": None},
        {"role": "assistant", "content": "[1] a.pdf", "metadata": {"title": "Sources cited (1)"}},
        {"role": "user", "content": "And?"},
    ]
    assert conv.api_messages(history, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And?"},
    ]
    assert conv.title_for(history) == "Hi"


def test_each_user_sees_only_their_conversations_newest_first():
    store = {}
    first, second = conv.new_conversation(), conv.new_conversation()
    store = conv.upsert(store, "alice", first, limit=10)
    store = conv.upsert(store, "alice", second, limit=10)
    assert [c["id"] for c in conv.user_conversations(store, "alice")] == [second["id"], first["id"]]
    assert conv.user_conversations(store, "bob") == []
    store = conv.upsert(store, "alice", {**first, "title": "again"}, limit=10)
    assert conv.user_conversations(store, "alice")[0]["title"] == "again"
    store = conv.upsert(store, "alice", conv.new_conversation(), limit=2)
    assert len(conv.user_conversations(store, "alice")) == 2  # the oldest went
    store = conv.remove(store, "alice", None)
    assert conv.user_conversations(store, "alice") == []


def test_merge_keeps_the_newer_copy_and_export_is_json():
    old = {"id": "a", "updated_at": "2026-01-01T00:00:00+00:00", "title": "old"}
    new = {"id": "a", "updated_at": "2026-02-01T00:00:00+00:00", "title": "new"}
    other = {"id": "b", "updated_at": "2026-03-01T00:00:00+00:00", "title": "b"}
    merged = conv.merge([old, other], [new])
    assert [c["title"] for c in merged] == ["b", "new"]
    exported = json.loads(conv.export_json("alice", merged))
    assert exported["user"] == "alice" and len(exported["conversations"]) == 2


def test_model_picker_lists_chat_models_running_first():
    models = [
        {"id": "embed", "kind": "embedding", "state": "running", "installed": True},
        {"id": "b", "kind": "chat", "state": "stopped", "installed": True},
        {"id": "a", "kind": "chat", "state": "running", "installed": True},
        {"id": "c", "kind": "chat", "state": "stopped", "installed": False},
    ]
    assert render.model_choices(models) == [
        ("a · ● running", "a"),
        ("b · ○ stopped", "b"),
        ("c · not installed", "c"),
    ]


def test_citations_escape_html_from_documents():
    cited = {"number": 1, "filename": "<b>x</b>.pdf", "page": None}
    cited |= {"snippet": "<script>alert(1)</script>", "passage": "<img src=x>"}
    event = {"citations": [cited]}
    shown = render.citations_markdown(event)
    assert "<script>" not in shown and "<img" not in shown and "&lt;b&gt;" in shown
    assert render.split_names("alice, bob  carol") == ["alice", "bob", "carol"]
