"""OpenAI-style error bodies and the checks a request passes before it reaches an instance."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from appliance.models.catalog import Catalog, ModelSpec


class RequestError(Exception):
    """A request the gateway refuses; rendered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[str] | None = None,
    ):
        super().__init__(message)
        self.details = details
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **({"details": self.details} if self.details else {}),
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as a server-sent event; OpenAI clients raise it as an APIError."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def server_error(message: str, code: str = "instance_failed", status: int = 502) -> RequestError:
    return RequestError(status, message, type="server_error", code=code)


def error_fields(body: bytes) -> tuple[int, str] | None:
    """The HTTP code (500 unless it says) and message of an OpenAI error body (`{"error":
    {...}}`, vLLM's too, an SSE event's `data:` prefix allowed); None when it is not one."""
    try:
        error = json.loads(body.decode(errors="replace").removeprefix("data:"))["error"]
        message = str(error.get("message") or error)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    # vLLM's code is the HTTP status; the gateway's own errors name theirs ("storage_full").
    code = error.get("code")
    return (code if isinstance(code, int) and code >= 400 else 500), message


def storage_full() -> RequestError:
    """A 507: a write refused for want of space, which the stores undid (nothing lost)."""
    return RequestError(
        507,
        "the appliance's storage is full: nothing was saved (what was stored before is kept); "
        "an administrator must free space",
        type="server_error",
        code="storage_full",
    )


def try_again_later(message: str, code: str, retry_after_s: int) -> RequestError:
    """A 429 that tells the client when to come back (Retry-After, seconds)."""
    return RequestError(
        429,
        message,
        type="rate_limit_error",
        code=code,
        headers={"retry-after": str(retry_after_s)},
    )


# Which request fields each endpoint needs, and which model kinds may serve it.
ENDPOINT_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "/v1/chat/completions": ("messages", ("chat",)),
    "/v1/completions": ("prompt", ("chat", "completion")),
    "/v1/embeddings": ("input", ("embedding",)),
}


def validate_request(path: str, body: dict[str, Any], catalog: Catalog) -> ModelSpec:
    """Check what the gateway can check cheaply; the model server checks the rest."""
    field, kinds = ENDPOINT_RULES[path]
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "You must provide a model parameter.", param="model")
    spec = catalog.get(model)
    if spec is None:
        raise RequestError(
            404,
            f"The model '{model}' does not exist. Available models: " + ", ".join(catalog.names()),
            param="model",
            code="model_not_found",
        )
    if spec.kind not in kinds:
        raise RequestError(
            400,
            f"The model '{model}' is a {spec.kind} model and cannot serve {path}.",
            param="model",
            code="model_not_supported",
        )
    if field not in body:
        raise RequestError(400, f"Missing required parameter: '{field}'.", param=field)
    if field == "messages" and (
        not isinstance(body["messages"], list)
        or not body["messages"]
        or not all(isinstance(m, dict) for m in body["messages"])
    ):
        message = "'messages' must be a non-empty array of objects."
        raise RequestError(400, message, param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false.", param="stream")
    for name in ("max_tokens", "max_completion_tokens"):
        if name not in body or body[name] is None:
            continue
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(400, f"'{name}' must be an integer.", param=name)
        if value < 1:
            raise RequestError(400, f"'{name}' must be at least 1, got {value}.", param=name)
        if value > spec.max_model_len:
            raise RequestError(
                400,
                f"'{name}' is {value}, but model '{model}' has a context length of "
                f"{spec.max_model_len} tokens.",
                param=name,
                code="context_length_exceeded",
            )
    return spec
