"""JSON request bodies of the gateway's own routes: parsed with a bound on nesting, checked
against a pydantic model, and refused with an OpenAI-style 400 error otherwise."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from appliance.gateway.protocol import RequestError

# Deeper than any real request (a tool's JSON schema nests about ten levels), and far below the
# interpreter's recursion limit that deep structures hit in json, pydantic and our own code.
MAX_DEPTH = 64

Model = TypeVar("Model", bound=BaseModel)


def parse_body(raw: bytes) -> dict[str, Any]:
    """`raw` as a JSON object nested at most MAX_DEPTH levels; a 400 RequestError otherwise."""
    if not raw.strip():
        raise RequestError(400, "The request body is empty; expected a JSON object.")
    try:
        body = json.loads(raw)
    except RecursionError:
        # The C decoder gives up near the recursion limit before our own check can run.
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    if _deeper_than(body, MAX_DEPTH):
        raise _too_deep()
    return body


async def json_object(request) -> dict[str, Any]:
    """The request's body as a JSON object (see `parse_body`)."""
    return parse_body(await request.body())


async def json_model(request, model: type[Model]) -> Model:
    """The request's body checked against `model`; a 400 naming the wrong field otherwise."""
    return validated(await json_object(request), model)


def validated(body: dict[str, Any], model: type[Model]) -> Model:
    """`body` checked against `model`; a 400 RequestError naming the first wrong field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        messages = [f"'{_where(e['loc'])}': {e['msg']}" for e in errors]
        first = errors[0]["loc"]
        raise RequestError(
            400,
            f"Invalid request: {messages[0]}.",
            param=str(first[0]) if first else None,
            details=messages if len(messages) > 1 else None,
        ) from None


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "body"


def _too_deep() -> RequestError:
    return RequestError(400, f"The request body is nested more than {MAX_DEPTH} levels deep.")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects in `value` nest more than `limit` levels (the top one is 1).

    Iterative, so that checking a deep value cannot itself run out of stack.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False
