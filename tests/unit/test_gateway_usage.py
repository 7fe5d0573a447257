"""What a request costs: usage read from plain answers (one choice, many, over 1 MiB), from a
stream's events, the usage chunk asked for on the client's behalf, and the cap on choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.gateway.protocol import RequestError
from appliance.gateway.usage import (
    Usage,
    UsageFilter,
    asking_for_usage,
    body_usage,
    check_choices,
    estimate_prompt,
    event_usage,
)

# A stream captured from vLLM (tests/unit/capture_vllm_streams.py), with include_usage.
CHAT_SSE = Path(__file__).parent / "testdata" / "vllm" / "chat.sse"


def _answer(choices: int, text: str, **usage) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}} for i in range(choices)
        ],
        "usage": usage,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def test_plain_answer_usage():
    body = _answer(1, "Paris.", prompt_tokens=12, completion_tokens=3, total_tokens=15)
    assert body_usage(body) == Usage(12, 3)


def test_many_choices_over_one_mebibyte_are_counted():
    # The case: n=4500 answers made a body over 1 MiB, whose usage was never read.
    body = _answer(4500, "x" * 300, prompt_tokens=17, completion_tokens=58_900)
    assert len(body) > 1 << 20
    assert body_usage(body) == Usage(17, 58_900)


def test_answer_text_cannot_fake_the_usage():
    # The model wrote a usage object into its answer: escaped, it is not the key.
    fake = '"usage":{"prompt_tokens":0,"completion_tokens":0}'
    body = _answer(2, fake, prompt_tokens=9, completion_tokens=40)
    assert body_usage(body) == Usage(9, 40)


def test_usage_elsewhere_than_at_the_end_is_found_by_a_full_parse():
    data = {"usage": {"prompt_tokens": 5, "completion_tokens": 7}, "choices": [], "x": {"usage": 1}}
    assert body_usage(json.dumps(data, indent=2).encode()) == Usage(5, 7)


def test_embeddings_usage_and_answers_without_one():
    assert body_usage(b'{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}') == Usage(8, 0)
    assert body_usage(b'{"error":{"message":"no"}}') is None
    assert body_usage(b"not json") is None


def _events() -> list[bytes]:
    return [e + b"\n\n" for e in CHAT_SSE.read_bytes().split(b"\n\n") if e]


def test_stream_events_usage_chunk_and_choices():
    events = _events()
    assert event_usage(events[-2]) == (Usage(16, 40), True, "vllm-0.32.0-e0333ba5")
    assert all(event_usage(e) is None for e in events[:-2] + events[-1:])
    # Continuous usage stats: usage in a chunk that has choices too.
    chunk = b'data: {"choices":[{"index":0}],"usage":{"prompt_tokens":3,"completion_tokens":1}}'
    assert event_usage(chunk) == (Usage(3, 1), False, None)


def test_hidden_usage_chunk_and_the_fingerprint_put_back():
    events, reported = _events(), []
    hidden = UsageFilter(True, reported.append)
    out = b"".join(hidden.events(e) for e in events)
    last, _usage_chunk, done = events[-3:]
    # Without include_usage vLLM stamps the fingerprint on the last chunk instead.
    stamped = last[:-3] + b',"system_fingerprint":"vllm-0.32.0-e0333ba5"}\n\n'
    assert out == b"".join(events[:-3]) + stamped + done
    assert reported == [Usage(16, 40)]

    asked, reported = UsageFilter(False, reported.append), []
    assert b"".join(asked.events(e) for e in events) == b"".join(events)


def test_held_events_of_several_choices_keep_their_order():
    def chunk(index: int, text: str, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": {"content": text}, "finish_reason": finish}
        data = json.dumps({"id": "c", "choices": [choice]}, separators=(",", ":"))
        return b"data: " + data.encode() + b"\n\n"  # compact, as vLLM writes

    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4}}\n\n'
    stream = [chunk(0, "a"), chunk(1, "a"), chunk(0, "b", "length"), chunk(1, "b"), chunk(1, "c")]
    reported: list[Usage] = []
    hidden = UsageFilter(True, reported.append)
    sent = [hidden.events(e) for e in [*stream, usage]]
    assert sent[:2] == stream[:2] and sent[2:5] == [b"", b"", b""]  # held from the first end
    assert sent[5] == b"".join(stream[2:])  # no fingerprint to put back: as they came
    assert reported == [Usage(5, 4)]
    # A stream that ends without a usage chunk gives back what it held.
    cut = UsageFilter(True, reported.append)
    assert cut.events(stream[2]) == b"" and cut.release() == stream[2] and cut.release() == b""


def test_streams_ask_for_usage_for_the_client_that_did_not():
    raw = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    sent, asked = asking_for_usage(raw)
    assert not asked
    assert json.loads(sent)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": False,
    }
    options = {"include_usage": False, "continuous_usage_stats": True}
    off = {"stream": True, "stream_options": options}
    sent, asked = asking_for_usage(json.dumps(off).encode())
    assert not asked and json.loads(sent)["stream_options"]["continuous_usage_stats"] is False
    # vLLM's include_usage is false unless set: empty options ask for nothing.
    sent, asked = asking_for_usage(b'{"stream": true, "stream_options": {}}')
    assert not asked and json.loads(sent)["stream_options"]["include_usage"] is True


@pytest.mark.parametrize(
    "options",
    [{"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True}],
)
def test_a_client_that_asked_gets_its_request_unchanged(options):
    raw = json.dumps({"stream": True, "stream_options": options}).encode()
    assert asking_for_usage(raw) == (raw, True)


def test_requests_the_instance_will_refuse_are_left_alone():
    for raw in (b"[1]", b'{"stream_options": "yes"}'):
        assert asking_for_usage(raw) == (raw, True)


def test_prompt_estimate_of_a_cut_stream():
    assert estimate_prompt(None) == 0
    assert estimate_prompt("abcdefgh") == 2
    assert estimate_prompt([{"role": "user", "content": "x" * 400}]) > 100


def test_choices_are_capped():
    check_choices({"n": 16, "best_of": 16}, 16)
    check_choices({"n": None}, 16)
    for body, param in (({"n": 17}, "n"), ({"best_of": 4500}, "best_of")):
        with pytest.raises(RequestError, match="at most 16 choices") as refused:
            check_choices(body, 16)
        assert refused.value.status == 400 and refused.value.param == param
    for bad in (0, -1, True, "2", 1.5):
        with pytest.raises(RequestError, match="positive integer"):
            check_choices({"n": bad}, 16)
