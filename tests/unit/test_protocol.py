"""Requests the gateway refuses itself get OpenAI-style errors that say what to fix."""

from __future__ import annotations

import pytest

from appliance.config import load_settings
from appliance.gateway.protocol import RequestError, validate_request
from appliance.models.catalog import load_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return load_catalog(load_settings(state_dir=tmp_path_factory.mktemp("s")))


CHAT = "/v1/chat/completions"


def refuse(path, body, catalog) -> RequestError:
    with pytest.raises(RequestError) as err:
        validate_request(path, body, catalog)
    return err.value


@pytest.mark.parametrize("messages", [["hi"], [], "hi", [{"role": "user", "content": "x"}, 5]])
def test_messages_must_be_a_list_of_objects(catalog, messages):
    e = refuse(CHAT, {"model": "tiny-chat", "messages": messages}, catalog)
    assert (e.status, e.param) == (400, "messages")


def test_unknown_model(catalog):
    e = refuse(CHAT, {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, catalog)
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model")
    assert "tiny-chat" in e.message  # says what exists


def test_absurd_max_tokens(catalog):
    msgs = [{"role": "user", "content": "hi"}]
    e = refuse(CHAT, {"model": "tiny-chat", "messages": msgs, "max_tokens": 10**9}, catalog)
    assert (e.status, e.param, e.code) == (400, "max_tokens", "context_length_exceeded")
    for bad in (0, -5, "many", 1.5, True):
        e = refuse(CHAT, {"model": "tiny-chat", "messages": msgs, "max_tokens": bad}, catalog)
        assert e.status == 400 and e.param == "max_tokens"


def test_missing_fields_and_wrong_kind(catalog):
    assert refuse(CHAT, {"messages": []}, catalog).param == "model"
    assert refuse(CHAT, {"model": "tiny-chat"}, catalog).param == "messages"
    assert refuse(CHAT, {"model": "tiny-chat", "messages": []}, catalog).param == "messages"
    e = refuse("/v1/embeddings", {"model": "tiny-chat", "input": "x"}, catalog)
    assert e.code == "model_not_supported"
    e = refuse(CHAT, {"model": "tiny-chat", "messages": [{}], "stream": "yes"}, catalog)
    assert e.param == "stream"


def test_valid_request_passes(catalog):
    spec = validate_request(
        "/v1/completions", {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 16}, catalog
    )
    assert spec.name == "tiny-chat"


def test_sse_error_event_shape():
    event = RequestError(502, "boom", type="server_error", code="instance_failed").sse_event()
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
