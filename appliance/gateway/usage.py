"""What a request costs in tokens: the usage vLLM reports in a plain answer (of any size) or in
a stream's last chunk (asked for on the client's behalf, and hidden again unless it asked), an
estimate for a stream cut before that chunk, and the cap on choices per request."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

from appliance.gateway.protocol import RequestError, try_again_later
from appliance.security.quotas import QuotaExceeded

USAGE_KEY = b'"usage":'
# A stream cut before its usage chunk (the client went away, the instance failed): its prompt is
# estimated at this many characters a token, and its answer at one token per choice per chunk
# (vLLM streams about one token per chunk), so that cutting streams short does not dodge quotas.
CHARS_PER_TOKEN = 4
CHOICE_MARKER = b'"finish_reason"'
# A choice's last chunk (finish_reason set) in vLLM's compact JSON.
FINISHED_MARKER = b'"finish_reason":"'
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


class UsageEvent(NamedTuple):
    """The usage an SSE event carries."""

    usage: Usage
    chunk: bool  # vLLM's usage chunk (no choices), not a chunk with continuous usage stats
    fingerprint: str | None


def event_usage(event: bytes) -> UsageEvent | None:
    """One SSE event's usage, if it has one."""
    if USAGE_KEY not in event or not event.startswith(b"data: {"):
        return None
    try:
        data = json.loads(event[len(b"data: ") :])
    except (ValueError, UnicodeDecodeError):
        return None
    found = usage_of(data.get("usage")) if isinstance(data, dict) else None
    if found is None:
        return None
    fingerprint = data.get("system_fingerprint")
    return UsageEvent(found, not data.get("choices"), fingerprint)


def _stamped(event: bytes, fingerprint: str) -> bytes:
    """A choice's last chunk with the `system_fingerprint` vLLM gives it when it sends no usage
    chunk: the chunk's last field, so it goes in as bytes (parsing and writing the chunk again
    could change how its numbers are written). A chunk with fields after `choices` is left."""
    body = event.rstrip(b"\n")
    try:
        data = json.loads(body[len(b"data: ") :])
    except (ValueError, UnicodeDecodeError):
        return event
    if not isinstance(data, dict) or list(data)[-1:] != ["choices"] or not body.endswith(b"}"):
        return event
    field = b',"system_fingerprint":' + json.dumps(fingerprint, ensure_ascii=False).encode()
    return body[:-1] + field + b"}" + event[len(body) :]


class UsageFilter:
    """Reads the usage of a stream's events, and hides the usage chunk from a client that did
    not ask for it while keeping the rest byte for byte: asked for usage, vLLM moves
    `system_fingerprint` from each choice's last chunk to the usage chunk, so from the first
    last chunk on, events are held until the usage chunk and the fingerprint put back."""

    def __init__(self, hide: bool, report: Callable[[Usage], None]):
        self.hide = hide
        self.report = report
        self._held: list[bytes] = []

    def events(self, out: bytes) -> bytes:
        """What the client gets of these complete events (b"" while they are held)."""
        if not self.hide:
            if USAGE_KEY in out:
                for event in out.split(b"\n\n")[:-1]:
                    if (found := event_usage(event)) is not None:
                        self.report(found.usage)
            return out
        sent = []
        for part in out.split(b"\n\n")[:-1]:
            event = part + b"\n\n"
            found = event_usage(event)
            if found is not None:
                self.report(found.usage)
            if found is not None and found.chunk:
                if found.fingerprint is not None:
                    self._held = [
                        _stamped(e, found.fingerprint) if FINISHED_MARKER in e else e
                        for e in self._held
                    ]
                sent.append(self.release())
            elif self._held or FINISHED_MARKER in event:
                self._held.append(event)
            else:
                sent.append(event)
        return b"".join(sent)

    def release(self) -> bytes:
        """The events held back, as they are (the stream ends without a usage chunk)."""
        held, self._held = b"".join(self._held), []
        return held


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
    if options is not None and options.get("include_usage"):
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
    return try_again_later(str(exc), "quota_exceeded", exc.retry_after_s)
