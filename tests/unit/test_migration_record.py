"""Token-based migration: what the gateway records from a stream, the continuation it sends,
and how the continuation's chunks are turned back into the client's stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.gateway.migration import StreamRecord, not_resumable

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def event(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def chat_chunk(content=None, ids=None, finish=None, role=None, prompt_ids=None, stop=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    if stop is not None:
        choice["stop_reason"] = stop
    data = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 100,
        "model": "tiny-chat",
        "choices": [choice],
    }
    if prompt_ids is not None:
        data["prompt_token_ids"] = prompt_ids
    return event(data)


def completion_chunk(text, ids, finish=None, usage=None) -> bytes:
    data = {
        "id": "cmpl-9",
        "object": "text_completion",
        "created": 555,
        "model": "tiny-chat",
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": ids,
            }
        ],
    }
    if usage is not None:
        data["usage"] = usage
    return event(data)


def decode(out: bytes) -> dict:
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    return json.loads(out[6:])


def chat_record(**body) -> StreamRecord:
    request = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "temperature": 0,
        "max_tokens": 10,
        **body,
    }
    record = StreamRecord.open(CHAT, json.dumps(request).encode())
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (CHAT, {"n": 2}, "several choices"),
        (CHAT, {"logprobs": True}, "log probabilities"),
        (CHAT, {"frequency_penalty": 0.5}, "presence or frequency penalty"),
        (CHAT, {"tools": [{"type": "function"}]}, "tool calls"),
        (CHAT, {"response_format": {"type": "json_object"}}, "structured output"),
        (CHAT, {"guided_json": {"type": "object"}}, "structured output"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, "several prompts"),
        (COMPLETIONS, {"prompt": "a", "echo": True}, "echo or suffix"),
        ("/v1/embeddings", {}, "not a completion"),
    ],
)
def test_streams_that_cannot_be_continued_from_tokens_are_left_in_place(path, body, reason):
    assert not_resumable(path, body) == reason
    assert StreamRecord.open(path, json.dumps(body).encode()) is None


def test_plain_streams_are_resumable():
    assert not_resumable(CHAT, {"messages": [], "temperature": 0, "seed": 1}) is None
    assert not_resumable(CHAT, {"tools": [{"type": "function"}], "tool_choice": "none"}) is None
    assert not_resumable(COMPLETIONS, {"prompt": [1, 2, 3]}) is None
    assert not_resumable(COMPLETIONS, {"prompt": ["one prompt"]}) is None


def test_the_instance_is_asked_for_token_ids_and_the_client_never_sees_them():
    record = chat_record()
    assert json.loads(record.first_request())["return_token_ids"] is True
    first = decode(record.relay(chat_chunk("", [], role="assistant", prompt_ids=[1, 2, 3]), False))
    assert "prompt_token_ids" not in first and first["choices"][0]["delta"]["role"] == "assistant"
    out = decode(record.relay(chat_chunk("Hello", [7]), False))
    assert "token_ids" not in out["choices"][0]
    assert out["choices"][0]["delta"]["content"] == "Hello"
    # vLLM sends a chunk for a token whose text it holds back only because ids were asked for.
    assert record.relay(chat_chunk(None, [8]), False) == b""
    assert record.prompt_ids == [1, 2, 3]
    assert record.generated == [7, 8] and record.complete == 1 and record.resumable


def test_a_client_that_asked_for_token_ids_keeps_them():
    record = chat_record(return_token_ids=True)
    first = decode(record.relay(chat_chunk("", [], role="assistant", prompt_ids=[1, 2]), False))
    assert first["prompt_token_ids"] == [1, 2]
    assert decode(record.relay(chat_chunk(None, [5]), False))["choices"][0]["token_ids"] == [5]
    # The client has that token's id: the continuation starts after it, never repeats it.
    assert json.loads(record.continuation()[1])["prompt"] == [1, 2, 5]


def test_the_continuation_is_the_prompt_plus_the_tokens_the_client_has():
    record = chat_record(max_tokens=10, min_tokens=4, seed=3, tools=[], stop=["\n\n"])
    record.relay(chat_chunk("", [], role="assistant", prompt_ids=[1, 2, 3]), False)
    record.relay(chat_chunk("Hel", [40]), False)
    record.relay(chat_chunk("lo", [41]), False)
    record.relay(chat_chunk(None, [42]), False)  # half a character, held back
    path, raw = record.continuation()
    body = json.loads(raw)
    assert path == COMPLETIONS
    # The held-back token is generated again, so its character comes out whole.
    assert body["prompt"] == [1, 2, 3, 40, 41]
    assert body["max_tokens"] == 8 and body["min_tokens"] == 2
    assert body["seed"] == 3 and body["temperature"] == 0 and body["stop"] == ["\n\n"]
    assert body["stream"] is True and body["return_token_ids"] is True
    assert "messages" not in body and "tools" not in body
    assert record.tokens == 5


def test_continued_chunks_look_like_the_clients_stream():
    record = chat_record(stream_options={"include_usage": True})
    record.relay(chat_chunk("", [], role="assistant", prompt_ids=[1, 2, 3]), False)
    record.relay(chat_chunk("Hel", [40]), False)
    record.continuation()
    # The target's first chunk repeats the whole prompt's ids: dropped with them.
    assert record.relay(completion_chunk("", []), True) == b""
    out = decode(record.relay(completion_chunk("lo", [41]), True))
    assert out["id"] == "chatcmpl-1" and out["created"] == 100
    assert out["object"] == "chat.completion.chunk" and out["model"] == "tiny-chat"
    assert out["choices"] == [
        {"index": 0, "delta": {"content": "lo"}, "logprobs": None, "finish_reason": None}
    ]
    last = decode(record.relay(completion_chunk("!", [42], finish="length"), True))
    assert last["choices"][0]["finish_reason"] == "length" and record.finished
    assert not record.resumable
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    tail = event(
        {
            "id": "cmpl-9",
            "object": "text_completion",
            "created": 555,
            "model": "tiny-chat",
            "choices": [],
            "usage": usage,
        }
    )
    out = decode(record.relay(tail, True))
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_a_completion_stream_continues_as_completion_chunks():
    body = {"model": "tiny-chat", "prompt": "Once", "stream": True, "max_tokens": 5}
    record = StreamRecord.open(COMPLETIONS, json.dumps(body).encode())
    first = completion_chunk(" upon", [11])
    data = json.loads(first[6:])
    data["choices"][0]["prompt_token_ids"] = [9]  # vLLM puts them in the choice here
    out = decode(record.relay(event(data), False))
    assert out["choices"][0]["text"] == " upon"
    assert "prompt_token_ids" not in out["choices"][0] and "token_ids" not in out["choices"][0]
    assert record.resumable
    _, raw = record.continuation()
    assert json.loads(raw)["prompt"] == [9, 11] and json.loads(raw)["max_tokens"] == 4
    out = decode(record.relay(completion_chunk(" a", [12]), True))
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == " a"
    assert out["id"] == "cmpl-9" and out["created"] == 555


def test_comments_pass_through_unchanged():
    record = chat_record()
    assert record.relay(b": keep-alive\n\n", False) == b": keep-alive\n\n"


def test_an_engine_without_token_ids_leaves_the_stream_where_it_is():
    record = chat_record()
    first = decode(record.relay(chat_chunk("", None, role="assistant"), False))
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert decode(record.relay(chat_chunk("Hello", None), False))
    assert not record.resumable
    record = chat_record()
    record.relay(chat_chunk("", [], role="assistant", prompt_ids=[1]), False)
    record.relay(chat_chunk("Hi", None), False)  # text without its token ids
    assert not record.resumable


VLLM = Path(__file__).parent / "testdata" / "vllm"
CUT = 12  # events relayed before the move (tests/unit/capture_vllm_streams.py)


def events(name: str) -> list[bytes]:
    raw = (VLLM / f"{name}.sse").read_bytes()
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


def client_text(chunks: list[bytes], chat: bool) -> tuple[str, list[dict]]:
    text, datas = "", []
    for out in (e + b"\n\n" for chunk in chunks for e in chunk.split(b"\n\n") if e):
        if out.startswith(b"data: {"):
            data = decode(out)
            datas.append(data)
            for choice in data["choices"]:
                text += (choice["delta"].get("content") or "") if chat else choice["text"]
    return text, datas


@pytest.mark.parametrize(
    ("name", "path"),
    [("chat", CHAT), ("completion", COMPLETIONS), ("chat_stop", CHAT)],
)
def test_a_real_stream_moved_mid_answer_reads_as_the_undisturbed_one(name, path):
    """Captured vLLM output: the whole greedy answer, and the continuation a second server
    streamed for the request the gateway built after CUT events. In `chat_stop` a stop string
    begins before the move and ends after it: neither instance sees it whole."""
    chat = path == CHAT
    body = (VLLM / f"{name}.request.json").read_bytes()
    whole = StreamRecord.open(path, body)
    undisturbed = [whole.relay(e, False) for e in events(name)[:-1]]
    expected, expected_datas = client_text(undisturbed, chat)

    record = StreamRecord.open(path, body)
    before = [record.relay(e, False) for e in events(name)[:CUT]]
    next_path, request = record.continuation()
    assert next_path == COMPLETIONS
    assert json.loads(request) == json.loads((VLLM / f"{name}.continuation.json").read_bytes())
    after = []
    for e in events(f"{name}.continuation")[:-1]:
        after.append(record.relay(e, True))
        if record.ended:  # the gateway found the stop string: it ends the answer itself
            after.append(record.ending())
            break
    text, datas = client_text(before + after, chat)
    assert text == expected and len(text) > 30
    original = decode(events(name)[0])
    assert {d["id"] for d in datas} == {original["id"]}
    assert {d["created"] for d in datas} == {original["created"]}
    assert all(
        "token_ids" not in c and "prompt_token_ids" not in c for d in datas for c in d["choices"]
    )
    finish = [c["finish_reason"] for d in datas for c in d["choices"] if c["finish_reason"]]
    assert finish == [
        c["finish_reason"] for d in expected_datas for c in d["choices"] if c["finish_reason"]
    ]
    if chat:  # usage over the whole answer, as the undisturbed stream reported it
        assert datas[-1]["usage"] == expected_datas[-1]["usage"]
        assert datas[-1]["usage"]["prompt_tokens"] == 16
    if name == "chat_stop":
        assert record.ended and after[-1].endswith(b"data: [DONE]\n\n")
        assert finish == ["stop"] and "ge o" not in text


def test_text_that_could_begin_a_stop_string_is_held_back_until_it_cannot():
    record = chat_record(stop=["END", "!"])
    assert json.loads(record.first_request())["include_stop_str_in_output"] is True
    record.relay(chat_chunk(role="assistant", content="", prompt_ids=[1, 2]), False)
    sent = [record.relay(chat_chunk(t, [i]), False) for i, t in enumerate(["ab", "cE", "Nx"])]
    assert [decode(o)["choices"][0]["delta"]["content"] for o in sent if o] == ["ab", "cE"]
    assert record.complete == 3  # every token's text is in the gateway's hands
    final = decode(record.relay(chat_chunk("yEND", [9], finish="stop", stop="END"), False))
    assert final["choices"][0]["delta"]["content"] == "Nxy"


def test_a_client_that_wants_the_stop_string_gets_it_and_nothing_is_held():
    record = chat_record(stop="END", include_stop_str_in_output=True)
    record.relay(chat_chunk(role="assistant", content="", prompt_ids=[1, 2]), False)
    first = decode(record.relay(chat_chunk("aE", [5]), False))
    assert first["choices"][0]["delta"]["content"] == "aE"  # as vLLM sends it: nothing held
    record.continuation()
    out = decode(record.relay(completion_chunk("NDb", [6]), True))
    assert out["choices"][0]["delta"]["content"] == "ND"
    assert out["choices"][0]["finish_reason"] == "stop" and record.ended


def test_stop_strings_count_only_after_min_tokens():
    record = chat_record(stop=["ab"], min_tokens=3)
    record.relay(chat_chunk(role="assistant", content="", prompt_ids=[1, 2]), False)
    record.relay(chat_chunk("xa", [5]), False)
    record.continuation()
    for i, text in enumerate(["b", "ab"]):  # tokens 2 and 3 of min_tokens=3 cannot stop
        out = decode(record.relay(completion_chunk(text, [6 + i]), True))
        assert out["choices"][0]["finish_reason"] is None
    out = decode(record.relay(completion_chunk("xab", [8]), True))
    assert out["choices"][0]["finish_reason"] == "stop" and record.ended
