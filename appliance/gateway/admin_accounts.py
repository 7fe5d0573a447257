"""Administrators' API for accounts: users, API keys, everyone's usage, and the audit log.
Every change is recorded in the audit log with the administrator who made it."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from appliance.errors import ApplianceError
from appliance.gateway.audit_events import audit
from appliance.gateway.auth import administrator
from appliance.gateway.json_body import json_object
from appliance.gateway.protocol import RequestError
from appliance.security.api_keys import KeyRefused, Principal

router = APIRouter(prefix="/admin", dependencies=[Depends(administrator)])
Admin = Annotated[Principal, Depends(administrator)]


def _auth(request: Request):
    return request.app.state.gateway.auth


async def _run(fn, *args):
    try:
        return await asyncio.to_thread(fn, *args)
    except (ApplianceError, KeyRefused) as exc:
        raise RequestError(400, str(exc)) from None


def _user(record) -> dict:
    return {
        "user": record.username,
        "role": record.role,
        "groups": record.groups,
        "created_at": record.created_at,
        "disabled": record.disabled,
    }


def _key(record) -> dict:
    out = asdict(record)
    out.pop("key_hash")
    return out


@router.get("/users")
async def list_users(request: Request) -> dict:
    return {"object": "list", "data": [_user(u) for u in _auth(request).users.records()]}


@router.post("/users", status_code=201)
async def add_user(request: Request, who: Admin) -> dict:
    body = await json_object(request)
    name, password = body.get("user"), body.get("password")
    role = "admin" if body.get("role") == "admin" else "user"
    groups = body.get("groups") or []
    if not isinstance(name, str) or not isinstance(password, str):
        raise RequestError(400, "send 'user' and 'password' (and 'role', 'groups')")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise RequestError(400, "'groups' must be a list of names", param="groups")
    record = await _run(_auth(request).users.add, name, password, role, groups)
    await audit(request, who.user, "user_add", name, role=role, groups=groups)
    return _user(record)


@router.post("/users/{name}/disable")
async def disable_user(name: str, request: Request, who: Admin) -> dict:
    auth = _auth(request)
    record = await _run(auth.users.set_disabled, name, True)
    revoked = await _run(auth.keys.revoke_user, name)
    await audit(request, who.user, "user_disable", name, keys_revoked=revoked)
    return {**_user(record), "keys_revoked": revoked}


@router.post("/users/{name}/enable")
async def enable_user(name: str, request: Request, who: Admin) -> dict:
    record = await _run(_auth(request).users.set_disabled, name, False)
    await audit(request, who.user, "user_enable", name)
    return _user(record)


@router.get("/keys")
async def list_keys(request: Request) -> dict:
    keys = [_key(r) for r in _auth(request).keys.records() if r.kind == "api"]
    return {"object": "list", "data": keys}


@router.post("/keys", status_code=201)
async def create_key(request: Request, who: Admin) -> dict:
    """A new API key; the key itself is in this answer and nowhere else, ever."""
    body = await json_object(request)
    user = body.get("user")
    if not isinstance(user, str) or not user:
        raise RequestError(400, "'user' is required", param="user")
    role = "admin" if body.get("role") == "admin" else "user"
    days = body.get("expires_in_days")
    expires = None
    if days is not None:
        if not isinstance(days, int | float) or days <= 0:
            raise RequestError(400, "'expires_in_days' must be a positive number")
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
    groups = [g for g in body.get("groups") or [] if isinstance(g, str)]
    secret, record = await _run(_auth(request).keys.create, user, role, groups, expires)
    await audit(
        request,
        who.user,
        "key_create",
        record.key_id,
        user=user,
        role=role,
        expires_at=record.expires_at,
    )
    return {**_key(record), "key": secret}


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request, who: Admin) -> dict:
    record = await _run(_auth(request).keys.revoke, key_id)
    await audit(request, who.user, "key_revoke", key_id, user=record.user)
    return _key(record)


@router.get("/usage")
async def all_usage(request: Request) -> dict:
    return {"object": "list", "data": request.app.state.gateway.quotas.usage()}


@router.get("/audit")
async def audit_tail(request: Request, limit: int = 100) -> dict:
    log = request.app.state.gateway.audit
    entries = await asyncio.to_thread(log.entries)
    result = await asyncio.to_thread(log.verify)
    return {
        "entries": entries[-max(1, min(limit, 5000)) :][::-1],
        "verification": asdict(result),
    }
