"""The web app's client of the gateway's HTTP API: everything the app does goes through here,
so a script with an API key can do the same."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from appliance.errors import ApplianceError
from appliance.lines import aiter_sse_lines


class GatewayError(ApplianceError):
    """The gateway refused a call or could not be reached; the message is its explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ChatEvent:
    """One thing that happened in a streamed chat answer."""

    kind: str
    """"waiting" (an instance is starting), "delta", "citations", "error" or "done"."""
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or f"HTTP {response.status_code}"


def parse_sse_line(line: str) -> ChatEvent | None:
    """A chat stream line as an event (None for blank lines and data the app does not use)."""
    if line.startswith(":"):
        return ChatEvent("waiting", line[1:].strip())
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return ChatEvent("done")
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    if "error" in event:
        error = event["error"]
        return ChatEvent("error", error.get("message", str(error)), error)
    choices = event.get("choices") or []
    if not choices:
        if "citations" in event:
            return ChatEvent("citations", data=event)
        return None
    delta = choices[0].get("delta") or {}
    finish = {"finish_reason": choices[0].get("finish_reason")}
    return ChatEvent("delta", delta.get("content") or "", finish)


class GatewayClient:
    """Async calls to the gateway, each with the signed-in user's token as its bearer key."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 600.0,
        verify: Any = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            verify=verify,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def _headers(token: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"} if token else {}

    async def _call(self, method: str, path: str, token: str | None = None, **kw) -> Any:
        try:
            response = await self._http.request(method, path, headers=self._headers(token), **kw)
        except httpx.HTTPError as exc:
            raise GatewayError(503, f"the gateway cannot be reached ({exc!r})") from None
        if response.status_code >= 400:
            raise GatewayError(response.status_code, _error_message(response))
        return response.json()

    async def health(self) -> dict[str, Any]:
        """The gateway's health check (GatewayError when it does not answer)."""
        return await self._call("GET", "/health")

    # ----- account --------------------------------------------------------------------------

    async def sign_in(self, username: str, password: str) -> dict[str, Any]:
        body = {"username": username, "password": password}
        return await self._call("POST", "/v1/auth/sign_in", json=body)

    async def sign_in_with_key(self, api_key: str) -> dict[str, Any]:
        return await self._call("POST", "/v1/auth/sign_in", json={"api_key": api_key})

    async def sign_out(self, token: str) -> None:
        await self._call("POST", "/v1/auth/sign_out", token)

    async def me(self, token: str | None) -> dict[str, Any]:
        return await self._call("GET", "/v1/me", token)

    # ----- models ---------------------------------------------------------------------------

    async def models(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/models", token))["data"]

    async def warm(self, token: str, model: str) -> dict[str, Any]:
        """Start `model` if nothing serves it yet; its catalog entry with the new state."""
        return await self._call("POST", f"/v1/models/{quote(model, safe='')}/warm", token)

    async def instances(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/admin/instances", token))["instances"]

    async def start_model(self, token: str, model: str) -> dict[str, Any]:
        return await self._call("POST", f"/admin/models/{quote(model, safe='')}/start", token)

    async def stop_instance(self, token: str, job_id: int) -> dict[str, Any]:
        return await self._call("POST", f"/admin/instances/{int(job_id)}/stop", token)

    async def chat_stream(self, token: str, body: dict[str, Any]) -> AsyncIterator[ChatEvent]:
        """A streamed chat completion as events; errors (also HTTP ones) come as an error event."""
        body = {**body, "stream": True}
        try:
            async with self._http.stream(
                "POST", "/v1/chat/completions", json=body, headers=self._headers(token)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    yield ChatEvent("error", _error_message(response))
                    return
                # Not aiter_lines(): it also breaks at U+2028 and U+0085, which answers hold
                # raw inside the JSON of an event.
                async for line in aiter_sse_lines(response):
                    event = parse_sse_line(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            yield ChatEvent("error", f"the connection to the gateway broke ({exc!r})")

    # ----- knowledge bases ------------------------------------------------------------------

    async def knowledge_bases(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/knowledge_bases", token))["data"]

    async def create_knowledge_base(
        self, token: str, name: str, readers: list[str], groups: list[str]
    ) -> dict[str, Any]:
        body = {"name": name, "readers": readers, "groups": groups}
        return await self._call("POST", "/v1/knowledge_bases", token, json=body)

    async def share_knowledge_base(
        self, token: str, name: str, readers: list[str], groups: list[str]
    ) -> dict[str, Any]:
        body = {"readers": readers, "groups": groups}
        return await self._call("POST", f"/v1/knowledge_bases/{_seg(name)}/share", token, json=body)

    async def delete_knowledge_base(self, token: str, name: str) -> None:
        await self._call("DELETE", f"/v1/knowledge_bases/{_seg(name)}", token)

    async def documents(self, token: str, kb: str) -> list[dict[str, Any]]:
        return (await self._call("GET", f"/v1/knowledge_bases/{_seg(kb)}/documents", token))["data"]

    async def upload(self, token: str, kb: str, path: Path, filename: str) -> dict[str, Any]:
        """Upload one file; {"results": [...], "errors": [...]} as the gateway reports them."""
        with path.open("rb") as f:
            files = [("files", (filename, f, "application/octet-stream"))]
            return await self._call(
                "POST", f"/v1/knowledge_bases/{_seg(kb)}/documents", token, files=files
            )

    async def sync(
        self, token: str, kb: str, manifest: dict[str, str], files: dict[str, Path]
    ) -> list[dict[str, Any]]:
        """One call of folder sync: the whole manifest (path -> sha256) and the files sent
        (path -> local file); each path's outcome as the gateway reports it."""
        with contextlib.ExitStack() as stack:
            parts: list[tuple[str, Any]] = [
                ("manifest", ("manifest.json", json.dumps(manifest).encode(), "application/json"))
            ]
            for name, path in files.items():
                parts.append(("files", (name, stack.enter_context(path.open("rb")))))
            path = f"/v1/knowledge_bases/{_seg(kb)}/sync"
            return (await self._call("POST", path, token, files=parts))["results"]

    async def delete_document(self, token: str, kb: str, filename: str) -> None:
        await self._call(
            "DELETE", f"/v1/knowledge_bases/{_seg(kb)}/documents/{_seg(filename)}", token
        )

    async def query(self, token: str, kb: str, text: str, top_k: int = 5) -> list[dict[str, Any]]:
        body = {"query": text, "top_k": top_k}
        return (
            await self._call("POST", f"/v1/knowledge_bases/{_seg(kb)}/query", token, json=body)
        )["data"]

    # ----- monitoring (administrators) ------------------------------------------------------

    async def monitoring_status(self, token: str) -> dict[str, Any]:
        return await self._call("GET", "/admin/monitoring/status", token)

    async def series(
        self, token: str, name: str, since_s: float = 3600, **labels: str
    ) -> list[dict[str, Any]]:
        params = {"name": name, "since_s": since_s, **labels}
        return (await self._call("GET", "/admin/monitoring/series", token, params=params))["series"]

    async def recent_requests(self, token: str, limit: int = 50) -> list[dict[str, Any]]:
        params = {"limit": limit}
        return (await self._call("GET", "/admin/monitoring/requests", token, params=params))[
            "requests"
        ]

    async def search(self, token: str, query: str) -> dict[str, Any]:
        return await self._call("GET", "/admin/monitoring/search", token, params={"q": query})

    # ----- accounts, usage and audit ----------------------------------------------------------

    async def my_usage(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/usage", token))["data"]

    async def users(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/admin/users", token))["data"]

    async def add_user(
        self, token: str, user: str, password: str, role: str, groups: list[str]
    ) -> dict[str, Any]:
        body = {"user": user, "password": password, "role": role, "groups": groups}
        return await self._call("POST", "/admin/users", token, json=body)

    async def set_user_enabled(self, token: str, user: str, enabled: bool) -> dict[str, Any]:
        action = "enable" if enabled else "disable"
        return await self._call("POST", f"/admin/users/{_seg(user)}/{action}", token)

    async def keys(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/admin/keys", token))["data"]

    async def create_key(
        self, token: str, user: str, role: str, expires_in_days: float | None
    ) -> dict[str, Any]:
        body = {"user": user, "role": role, "expires_in_days": expires_in_days}
        return await self._call("POST", "/admin/keys", token, json=body)

    async def revoke_key(self, token: str, key_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/admin/keys/{_seg(key_id)}/revoke", token)

    async def usage(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/admin/usage", token))["data"]

    async def audit(self, token: str, limit: int = 50) -> dict[str, Any]:
        return await self._call("GET", "/admin/audit", token, params={"limit": limit})

    # ----- fine-tuning ------------------------------------------------------------------------

    async def upload_dataset(self, token: str, path: Path, filename: str) -> dict[str, Any]:
        with path.open("rb") as f:
            files = [("file", (filename, f, "application/jsonl"))]
            data = {"purpose": "fine-tune"}
            return await self._call("POST", "/v1/files", token, files=files, data=data)

    async def create_fine_tune(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/v1/fine_tuning/jobs", token, json=body)

    async def fine_tunes(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/fine_tuning/jobs", token))["data"]

    async def cancel_fine_tune(self, token: str, job_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/fine_tuning/jobs/{_seg(job_id)}/cancel", token)

    async def fine_tune_log(self, token: str, job_id: str) -> str:
        data = await self._call("GET", f"/v1/fine_tuning/jobs/{_seg(job_id)}/events", token)
        return "\n".join(e["message"] for e in data["data"])

    async def fine_tune_metrics(self, token: str, job_id: str) -> list[dict[str, Any]]:
        path = f"/v1/fine_tuning/jobs/{_seg(job_id)}/metrics"
        return (await self._call("GET", path, token))["data"]

    # ----- conversations saved on the appliance ---------------------------------------------

    async def saved_conversations(self, token: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/conversations", token))["data"]

    async def save_conversation(self, token: str, conversation: dict[str, Any]) -> None:
        path = f"/v1/conversations/{_seg(conversation['id'])}"
        await self._call("PUT", path, token, json=conversation)

    async def delete_saved_conversation(self, token: str, conversation_id: str | None) -> None:
        path = "/v1/conversations" + (f"/{_seg(conversation_id)}" if conversation_id else "")
        await self._call("DELETE", path, token)


def _seg(value: str) -> str:
    """A path segment, quoted so names with '/', '?' or '#' reach the gateway intact."""
    return quote(value, safe="")
