"""The gateway reads an instance's in-band error event (vLLM's, made by vLLM's own code here)."""

from __future__ import annotations

import json

from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.v1.engine.exceptions import EngineDeadError

from appliance.gateway.stream import upstream_error


def event(exc: Exception) -> bytes:
    # As vLLM's chat stream generator writes it after its 200 (create_streaming_error_response).
    return f"data: {json.dumps(create_error_response(exc).model_dump())}\n\n".encode()


def test_a_dead_engine_is_the_instance_s_fault():
    code, message = upstream_error(event(EngineDeadError()))
    assert code >= 500
    assert "EngineCore encountered an issue" in message


def test_a_bad_request_is_the_client_s():
    code, message = upstream_error(event(ValueError("max_tokens is too large")))
    assert code == 400
    assert message == "max_tokens is too large"


def test_an_unreadable_event_counts_as_the_instance_s_fault():
    assert upstream_error(b'data: {"error": nonsense\n\n')[0] == 500
    assert upstream_error(b'data: {"error": "a bare string"}\n\n')[0] == 500
