"""Signing in and out, who am I, and the conversations a user chose to save on the appliance."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from appliance.gateway.audit_events import audit
from appliance.gateway.auth import (
    AccessRefused,
    authenticated,
    key_refused,
    oidc_token,
    principal,
)
from appliance.gateway.json_body import json_object
from appliance.gateway.protocol import RequestError
from appliance.security.api_keys import KeyRefused, Principal
from appliance.security.secret_files import replace_secret_file

sign_in_router = APIRouter(prefix="/v1/auth")
router = APIRouter(dependencies=[Depends(authenticated)])
Who = Annotated[Principal, Depends(authenticated)]
CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _auth(request: Request):
    return request.app.state.gateway.auth


def _account(who: Principal, **extra) -> dict[str, Any]:
    return {
        "user": who.user,
        "role": "admin" if who.admin else "user",
        "groups": sorted(who.groups),
        **extra,
    }


@sign_in_router.post("/sign_in")
async def sign_in(request: Request) -> dict:
    """Exchange a username and password (or an API key) for a token to send as the bearer key."""
    auth = _auth(request)
    body = await json_object(request)
    if auth.single_user:
        return _account(principal(request), token="", kind="none", single_user=True)
    if isinstance(body.get("api_key"), str):
        try:
            record = auth.keys.check(body["api_key"])
        except KeyRefused as exc:
            raise key_refused(exc, "sign_in_refused") from None
        await audit(request, record.user, "sign_in", "api_key", key_id=record.key_id)
        return _account(
            record.principal(),
            token=body["api_key"],
            kind=record.kind,
            expires_at=record.expires_at,
            single_user=False,
        )
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise RequestError(400, "send 'username' and 'password', or 'api_key'")
    try:
        secret, record = await asyncio.to_thread(auth.sign_in, username, password)
    except AccessRefused:
        raise  # counted, not recorded one by one: a locked-out name costs nothing to retry
    except RequestError as exc:
        # Recorded one by one: each costs a password hash, and a name is locked out after
        # sign_in_max_failures; the name is at most MAX_USERNAME_LENGTH characters here.
        await audit(request, username, "sign_in_refused", "password", reason=exc.message)
        raise
    await audit(request, record.user, "sign_in", "password", key_id=record.key_id)
    return _account(
        record.principal(),
        token=secret,
        kind="session",
        expires_at=record.expires_at,
        single_user=False,
    )


@router.post("/v1/auth/sign_out")
async def sign_out(request: Request) -> dict:
    """End the presented sign-in session (an API key stays valid: revoke it with `keys`)."""
    auth = _auth(request)
    if oidc_token(request.headers.get("authorization")):
        # Nothing kept here to end: the token is good until it expires or the provider
        # revokes it (the web app forgets it at sign-out).
        return {"signed_out": False}
    record = auth.key_record(request.headers.get("authorization"))
    if record is not None and record.kind == "session":
        await asyncio.to_thread(auth.keys.revoke, record.key_id)
        await audit(request, record.user, "sign_out", "session", key_id=record.key_id)
        return {"signed_out": True}
    return {"signed_out": False}


@router.get("/v1/me")
async def me(request: Request, who: Who) -> dict:
    auth = _auth(request)
    if oidc_token(request.headers.get("authorization")):
        return _account(who, single_user=False, kind="oidc", expires_at=None)
    record = auth.key_record(request.headers.get("authorization"))
    return _account(
        who,
        single_user=record is None,
        kind=record.kind if record else "none",
        expires_at=record.expires_at if record else None,
    )


@router.get("/v1/usage")
async def my_usage(request: Request, who: Who) -> dict:
    """The caller's use against its limits: as a user, and with the key it presents."""
    quotas = request.app.state.gateway.quotas
    rows = quotas.usage("user", who.user) + (quotas.usage("key", who.key_id) if who.key_id else [])
    return {"object": "list", "data": rows}


# ----- conversations saved on the appliance (only when a user turns saving on) ---------------


class ConversationStore:
    """One 0600 JSON file per conversation, in a directory per user."""

    def __init__(self, root: Path):
        self.root = root

    def _dir(self, user: str) -> Path:
        # Hashed: user names from API keys are free text and must not shape paths.
        return self.root / hashlib.sha256(user.encode()).hexdigest()[:32]

    def _path(self, user: str, conversation_id: str) -> Path:
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise RequestError(400, "a conversation id is 1-64 letters, digits, '_' or '-'")
        return self._dir(user) / f"{conversation_id}.json"

    def list(self, user: str) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self._dir(user).glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a file being replaced right now, or damaged: skip, do not fail the list
        return sorted(out, key=lambda c: c.get("updated_at", ""), reverse=True)

    def get(self, user: str, conversation_id: str) -> dict[str, Any]:
        try:
            return json.loads(self._path(user, conversation_id).read_text())
        except FileNotFoundError:
            raise RequestError(404, f"no saved conversation {conversation_id}") from None

    def put(self, user: str, conversation_id: str, conversation: dict[str, Any]) -> None:
        if not isinstance(conversation.get("messages"), list):
            raise RequestError(400, "a conversation needs a 'messages' list", param="messages")
        conversation["id"] = conversation_id
        path = self._path(user, conversation_id)
        replace_secret_file(path, json.dumps(conversation).encode())

    def delete(self, user: str, conversation_id: str | None = None) -> int:
        paths = (
            [self._path(user, conversation_id)]
            if conversation_id
            else list(self._dir(user).glob("*.json"))
        )
        deleted = 0
        for path in paths:
            try:
                path.unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        return deleted


def _conversations(request: Request) -> ConversationStore:
    return ConversationStore(request.app.state.gateway.settings.conversations_dir)


@router.get("/v1/conversations")
async def list_conversations(request: Request, who: Who) -> dict:
    data = await asyncio.to_thread(_conversations(request).list, who.user)
    return {"object": "list", "data": data}


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request, who: Who) -> dict:
    return await asyncio.to_thread(_conversations(request).get, who.user, conversation_id)


@router.put("/v1/conversations/{conversation_id}")
async def put_conversation(conversation_id: str, request: Request, who: Who) -> dict:
    body = await json_object(request)
    await asyncio.to_thread(_conversations(request).put, who.user, conversation_id, body)
    return {"id": conversation_id, "saved": True}


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, who: Who) -> dict:
    deleted = await asyncio.to_thread(_conversations(request).delete, who.user, conversation_id)
    return {"id": conversation_id, "deleted": bool(deleted)}


@router.delete("/v1/conversations")
async def delete_all_conversations(request: Request, who: Who) -> dict:
    return {"deleted": await asyncio.to_thread(_conversations(request).delete, who.user)}
