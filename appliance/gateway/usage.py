"""What a request costs in tokens: the usage vLLM reports in a plain answer (of any size) or in
a stream's last chunk (asked for on the client's behalf, and hidden again unless it asked), an
estimate for a stream cut before that chunk, and the cap on choices per request."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from appliance.gateway.protocol import RequestError
from appliance.security.quotas import QuotaExceeded

USAGE_KEY = b'"usage":'
# A stream cut before its usage chunk (the client went away, the instance failed): its prompt is
# estimated at this many characters a token, and its answer at one token per choice per chunk
# (vLLM streams about one token per chunk), so that cutting streams short does not dodge quotas.
CHARS_PER_TOKEN = 4
CHOICE_MARKER = b'"finish_reason"'
_DECODER = json.JSONDecoder()


class Usage(NamedTuple):
    """Tokens of one request, as vLLM counts them (all choices together)."""

    prompt: int
    completion: int


def usage_of(data: Any) -> Usage | None:
    """The tokens of an OpenAI `usage` object (embeddings have no completion tokens)."""
    if not isinstance(data, dict):
        return None
    prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens") or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(max(0, prompt), max(0, completion))


def body_usage(body: bytes) -> Usage | None:
    """The usage of a plain answer. vLLM writes it after the choices, so it is looked for from
    the end: a huge answer (many choices, long ones) costs no parse of the whole. Inside JSON
    strings quotes are escaped, so the answer's text cannot fake the key; should the object
    found not be a usage, the whole body is parsed."""
    at = body.rfind(USAGE_KEY)
    if at >= 0:
        try:
            data, _ = _DECODER.raw_decode(body[at + len(USAGE_KEY) :].decode().lstrip())
            found = usage_of(data)
        except (ValueError, UnicodeDecodeError):
            found = None
        if found is not None:
            return found
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return usage_of(data.get("usage")) if isinstance(data, dict) else None


def event_usage(event: bytes) -> tuple[Usage | None, bool]:
    """One SSE event's usage, and whether the event is vLLM's usage chunk (no choices)."""
    if USAGE_KEY not in event or not event.startswith(b"data: {"):
        return None, False
    try:
        data = json.loads(event[len(b"data: ") :])
    except (ValueError, UnicodeDecodeError):
        return None, False
    found = usage_of(data.get("usage")) if isinstance(data, dict) else None
    return found, found is not None and not data.get("choices")


def asking_for_usage(raw: bytes) -> tuple[bytes, bool]:
    """A streamed request as sent upstream, with `stream_options.include_usage` (vLLM reports a
    stream's usage only then), and whether the client asked for the usage chunk itself."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw, True  # the instance answers it with an error: nothing to hide
    options = body.get("stream_options") if isinstance(body, dict) else None
    if not isinstance(body, dict) or (options is not None and not isinstance(options, dict)):
        return raw, True
    # vLLM's StreamOptions: include_usage is true unless set otherwise.
    if options is not None and options.get("include_usage", True):
        return raw, True
    # Continuous usage stats would put usage in every chunk: off, as without include_usage.
    body["stream_options"] = {**(options or {}), "include_usage": True}
    body["stream_options"]["continuous_usage_stats"] = False
    return json.dumps(body).encode(), False


def estimate_prompt(prompt: Any) -> int:
    """Tokens of a prompt (messages or text) whose count vLLM did not report."""
    if prompt is None:
        return 0
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return -(-len(text) // CHARS_PER_TOKEN)


def check_choices(body: dict[str, Any], max_n: int) -> None:
    """Refuse more choices than `security.max_n` (each is generated in full)."""
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(400, f"'{name}' must be a positive integer.", param=name)
        if value > max_n:
            raise RequestError(
                400,
                f"'{name}' is {value}, but this appliance allows at most {max_n} choices per "
                "request (security.max_n).",
                param=name,
                code="too_many_choices",
            )


def quota_error(exc: QuotaExceeded) -> RequestError:
    """The client's 429 for a refused request."""
    return RequestError(
        429,
        str(exc),
        type="rate_limit_error",
        code="quota_exceeded",
        headers={"retry-after": str(exc.retry_after_s)},
    )
