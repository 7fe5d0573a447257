"""Token-based migration of a streamed completion: what the gateway records while relaying it,
and how it is continued on another instance.

The gateway asks the instance for token ids (vLLM's `return_token_ids`) and removes them before
the client sees the chunk. It counts only the tokens it has relayed, so when the stream moves
(preemption, node drain, consolidation, or a crash) the new instance is sent the prompt's token
ids plus exactly those tokens as a plain completion prompt. Its KV cache is recomputed from them
and it generates the rest, which is turned back into the client's format (chat or completion
chunks, with the original id, creation time and usage counts). Under greedy decoding the
answer is the one the first instance would have given. Stop strings are held back and searched
by the gateway (stop_strings.py), since each instance sees only its own part of the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appliance.gateway.stop_strings import StopStrings

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# Request fields that carry over to the continuation (a plain completion): sampling and stop
# settings. Everything else (messages, tools, templates) is already in the prompt's token ids.
CONTINUATION_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "repetition_penalty",
    "length_penalty",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "user",
    "priority",
    "stream_options",
)


def not_resumable(path: str, body: dict[str, Any]) -> str | None:
    """Why a streamed request cannot be continued from its tokens elsewhere (None: it can).
    Such a stream stays on its instance until it ends, as long as the instance lives."""
    if path not in (CHAT_PATH, COMPLETIONS_PATH):
        return "not a completion"
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return "several choices"
    if body.get("use_beam_search"):
        return "beam search"
    if body.get("logprobs") or body.get("top_logprobs") or body.get("prompt_logprobs"):
        return "log probabilities"
    if body.get("echo") or body.get("suffix"):
        return "echo or suffix"
    if body.get("presence_penalty") or body.get("frequency_penalty"):
        # They count the generated tokens only; in a continuation those are part of the prompt.
        return "presence or frequency penalty"
    if body.get("tools") and body.get("tool_choice") != "none":
        return "tool calls"
    fmt = body.get("response_format")
    if (
        (fmt and fmt.get("type") != "text")
        or body.get("structured_outputs")
        or any(k.startswith("guided_") and body[k] for k in body)
    ):
        # A grammar's state cannot be restored from tokens.
        return "structured output"
    prompt = body.get("prompt")
    if (
        path == COMPLETIONS_PATH
        and isinstance(prompt, list)
        and prompt
        and (not isinstance(prompt[0], int) and len(prompt) != 1)
    ):
        return "several prompts"
    return None


def _encode(data: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


@dataclass(eq=False)
class StreamRecord:
    """One resumable stream: its request and the tokens the client has received so far."""

    path: str
    body: dict[str, Any]
    client_wants_ids: bool
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    # Tokens up to here produced text the client has; later ones were held back by the
    # detokenizer (half a character) and are generated again after a move.
    complete: int = 0
    # Generated tokens that were part of the current continuation's prompt.
    base: int = 0
    finished: bool = False
    chunk_id: str | None = None
    created: int | None = None
    model: str | None = None
    moves: int = 0
    stop: StopStrings | None = None
    ended: bool = False
    """The gateway found a stop string across a move and ended the answer itself."""

    @classmethod
    def open(cls, path: str, raw: bytes) -> StreamRecord | None:
        """The record of a new stream, or None when it is not resumable."""
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(body, dict) or not_resumable(path, body) is not None:
            return None
        return cls(path, body, bool(body.get("return_token_ids")), stop=StopStrings.of(body))

    @property
    def chat(self) -> bool:
        return self.path == CHAT_PATH

    @property
    def tokens(self) -> int:
        """Tokens a move recomputes (prompt and generated)."""
        return len(self.prompt_ids or ()) + self.complete

    def remaining(self, max_model_len: int) -> int:
        """Tokens still to generate, at most (the request's limit, else the context's)."""
        limit = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        left = max_model_len - len(self.prompt_ids or ()) - len(self.generated)
        if limit:
            left = min(left, int(limit) - len(self.generated))
        return max(0, left)

    def worth_moving(self, max_model_len: int, prefill_speedup: float) -> bool:
        """The rebalancing cost model (docs/preemption.md): a move recomputes `tokens` in one
        prefill, which costs about 1/`prefill_speedup` of generating as many; it pays when the
        tokens still to come outweigh that."""
        return self.remaining(max_model_len) * prefill_speedup >= self.tokens

    @property
    def resumable(self) -> bool:
        return self.prompt_ids is not None and not self.finished

    def first_request(self) -> bytes:
        """The client's request, asking the instance for token ids."""
        return json.dumps({**self.body, **self._ask_for}).encode()

    @property
    def _ask_for(self) -> dict[str, Any]:
        """What every instance is asked for beyond the client's request: token ids, and stop
        strings kept in the output (the gateway holds them back itself)."""
        asked: dict[str, Any] = {"return_token_ids": True}
        if self.stop is not None:
            asked["include_stop_str_in_output"] = True
        return asked

    def continuation(self) -> tuple[str, bytes]:
        """The request that continues this stream on another instance."""
        assert self.prompt_ids is not None
        del self.generated[self.complete :]
        self.base = len(self.generated)
        body = {k: self.body[k] for k in CONTINUATION_FIELDS if k in self.body}
        body.update(prompt=self.prompt_ids + self.generated, stream=True, **self._ask_for)
        limit = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        if limit:
            body["max_tokens"] = max(1, int(limit) - self.base)
        if self.body.get("min_tokens"):
            body["min_tokens"] = max(0, int(self.body["min_tokens"]) - self.base)
        self.moves += 1
        return COMPLETIONS_PATH, json.dumps(body).encode()

    def relay(self, event: bytes, continued: bool) -> bytes:
        """Record one SSE event from the instance; what the client gets for it ("" for nothing:
        a chunk sent only to carry token ids)."""
        if not event.startswith(b"data: {"):
            return event
        data = json.loads(event[6:])
        if continued:
            data = self._as_client_chunk(data)
        elif self.chunk_id is None:
            # An engine that does not know return_token_ids leaves prompt_ids None: the stream
            # is then relayed as it comes, and not resumable. Chat chunks carry the prompt's
            # ids at the top, completion chunks in their choice.
            choices = data.get("choices") or [{}]
            self.prompt_ids = data.get("prompt_token_ids") or choices[0].get("prompt_token_ids")
            self.chunk_id, self.created = data.get("id"), data.get("created")
            self.model = data.get("model")
        if not self.client_wants_ids:
            data.pop("prompt_token_ids", None)
        carries = self.client_wants_ids or data.get("usage") is not None
        for choice in data.get("choices") or []:
            ids = choice.get("token_ids")
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if ids is None and text:
                self.prompt_ids = None  # text without its tokens: no exact continuation
            self.generated += ids or []
            if text or (ids and self.client_wants_ids):
                # Delivered: the client has seen this token (its text, or its id).
                self.complete = len(self.generated)
            if choice.get("finish_reason"):
                self.finished = True
                self.complete = len(self.generated)
            if self.stop is not None and (text or choice.get("finish_reason")):
                text = self._stop_text(choice, text or "", continued)
            if not self.client_wants_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
            carries = carries or bool(
                text
                or choice.get("finish_reason")
                or choice.get("logprobs")
                or (choice.get("delta") or {}).get("role")
                or (choice.get("delta") or {}).get("reasoning")
            )
        return _encode(data) if carries or not data.get("choices") else b""

    def _stop_text(self, choice: dict[str, Any], text: str, continued: bool) -> str:
        """The choice's text as the client gets it, with stop strings held back or cut."""
        assert self.stop is not None
        text, found = self.stop.pass_on(
            text,
            choice.get("stop_reason"),
            bool(choice.get("finish_reason")),
            search=continued,
            generated=len(self.generated),
        )
        if self.chat:
            choice["delta"] = {**(choice.get("delta") or {}), "content": text}
        else:
            choice["text"] = text
        if found is not None:
            choice.update(finish_reason="stop", stop_reason=found)
            self.finished = self.ended = True
        return text

    def ending(self) -> bytes:
        """The end of an answer the gateway ended itself: usage if asked for, then [DONE]."""
        out = b""
        if (self.body.get("stream_options") or {}).get("include_usage"):
            prompt, completion = len(self.prompt_ids or ()), len(self.generated)
            out = _encode(
                {
                    "id": self.chunk_id,
                    "created": self.created,
                    "model": self.model,
                    "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                }
            )
        return out + b"data: [DONE]\n\n"

    def _as_client_chunk(self, data: dict[str, Any]) -> dict[str, Any]:
        """A continuation's completion chunk, as the chunk the client's stream would have had."""
        out: dict[str, Any] = {
            "id": self.chunk_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }
        choices = []
        for choice in data.get("choices") or []:
            item: dict[str, Any] = {"index": choice.get("index", 0)}
            text = choice.get("text") or ""
            if self.chat:
                item["delta"] = {"content": text} if text else {}
            else:
                item["text"] = text
            item["logprobs"] = None
            item["finish_reason"] = choice.get("finish_reason")
            if choice.get("finish_reason"):
                item["stop_reason"] = choice.get("stop_reason")
            if "token_ids" in choice:
                item["token_ids"] = choice["token_ids"]
            choices.append(item)
        out["choices"] = choices
        usage = data.get("usage")
        if usage:
            prompt = len(self.prompt_ids or ())
            completion = self.base + int(usage.get("completion_tokens") or 0)
            out["usage"] = {
                **usage,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        elif "usage" in data:
            out["usage"] = None
        return out
