"""JSON bodies of the gateway's own routes: nesting is bounded and types are checked, and both
give a 400 that says what is wrong, never a RecursionError or a TypeError (a 500)."""

from __future__ import annotations

import json

import pytest

from appliance.gateway.json_body import MAX_DEPTH, parse_body, validated
from appliance.gateway.knowledge import CreateRequest, KnowledgeChat, QueryRequest, ShareRequest
from appliance.gateway.protocol import RequestError


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as err:
        fn(*args)
    assert err.value.status == 400
    assert err.value.body()["error"]["type"] == "invalid_request_error"
    return err.value


@pytest.mark.parametrize("raw", [b"", b"  ", b"{not json", b"[1, 2]", b"\xff\xfe", b"5"])
def test_malformed_bodies(raw):
    refused(parse_body, raw)


def nested(depth: int) -> bytes:
    """An object whose values nest `depth` levels in all (the body itself is level 1)."""
    return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 100_000])
def test_deep_nesting_is_refused(depth):
    # 100000 levels make json.loads raise RecursionError; 900 pass it and meet our own bound.
    assert "nested more than" in refused(parse_body, nested(depth)).message


def test_nesting_up_to_the_bound_is_accepted():
    assert json.dumps(parse_body(nested(MAX_DEPTH))).count("[") == MAX_DEPTH - 1
    deep_object = b'{"a": ' + b'{"b": ' * (MAX_DEPTH - 1) + b"1" + b"}" * MAX_DEPTH
    assert parse_body(deep_object)["a"]


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (CreateRequest, {"name": "docs", "readers": 5}, "readers"),
        (CreateRequest, {"name": "docs", "readers": "bob"}, "readers"),
        (CreateRequest, {"name": "docs", "groups": ["ml", 7]}, "groups"),
        (CreateRequest, {"name": 5}, "name"),
        (CreateRequest, {}, "name"),
        (ShareRequest, {"readers": "bob"}, "readers"),
        (QueryRequest, {"query": "pump", "top_k": "abc"}, "top_k"),
        (QueryRequest, {"query": "pump", "top_k": "5"}, "top_k"),
        (QueryRequest, {"query": "pump", "top_k": True}, "top_k"),
        (QueryRequest, {"query": "pump", "top_k": 0}, "top_k"),
        (QueryRequest, {"query": "pump", "mode": "magic"}, "mode"),
        (QueryRequest, {"query": ["pump"]}, "query"),
        (KnowledgeChat, {"knowledge_bases": ["docs"], "messages": ["hi"]}, "messages"),
        (KnowledgeChat, {"knowledge_bases": "docs", "messages": []}, "knowledge_bases"),
        (KnowledgeChat, {"knowledge_bases": [], "messages": []}, "knowledge_bases"),
    ],
)
def test_wrong_types_name_the_field(model, body, param):
    error = refused(validated, body, model)
    assert error.param == param
    assert f"'{param}" in error.message


def test_right_types_pass():
    body = validated({"name": "docs", "readers": ["bob"], "extra": 1}, CreateRequest)
    assert (body.name, body.readers, body.groups) == ("docs", ["bob"], [])
    assert validated({"query": "pump", "top_k": 3}, QueryRequest).top_k == 3
