"""HTTP routes of the gateway: the OpenAI API, health, and the admin view of instances."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from appliance.errors import ApplianceError
from appliance.gateway.audit_events import audit
from appliance.gateway.auth import administrator, authenticated, principal
from appliance.gateway.json_body import parse_body
from appliance.gateway.knowledge import grounded_chat
from appliance.gateway.observe import observed
from appliance.gateway.prefix_key import prefix_key
from appliance.gateway.protocol import RequestError, validate_request
from appliance.gateway.usage import check_choices
from appliance.serving.instance import Instance, InstanceState

router = APIRouter()
# Every route but /health needs a principal (a valid API key once any key exists).
api = APIRouter(dependencies=[Depends(authenticated)])
admin_api = APIRouter(prefix="/admin", dependencies=[Depends(administrator)])
STARTED = int(time.time())


def _state(request: Request):
    return request.app.state.gateway


def _model_entry(gw, spec) -> dict:
    manager = gw.manager
    # An adapter runs on its base model's instances: their state is its state.
    insts = manager.instances(spec.serving_model)
    return {
        "id": spec.name,
        "object": "model",
        "created": STARTED,
        "owned_by": "appliance",
        "state": manager.model_state(spec.serving_model),
        "base_model": spec.base_model,
        "installed": spec.installed(gw.settings),
        "kind": spec.kind,
        "max_model_len": spec.max_model_len,
        "instances": sum(1 for i in insts if i.routable),
        "description": spec.description,
        "parameters": spec.parameters,
        "size_gb": spec.size_gb,
        "needs": spec.needs(),
        "resources": spec.resources.model_dump(),
    }


@router.get("/health")
async def health(request: Request) -> dict:
    # `tls`: this request reached the gateway over TLS (how a client, the web app, can tell).
    return {"status": "ok", "tls": request.url.scheme == "https"}


@api.get("/v1/models")
async def list_models(request: Request) -> dict:
    gw = _state(request)
    return {"object": "list", "data": [_model_entry(gw, spec) for spec in gw.catalog]}


@api.post("/v1/models/{model}/warm")
async def warm_model(model: str, request: Request):
    """Start the model if nothing serves it yet (any user may: a chat request would too)."""
    gw = _state(request)
    spec = gw.catalog.get(model)
    if spec is None:
        return _unknown_model(model)
    if not spec.installed(gw.settings):
        return _not_installed(spec.name)
    model = spec.serving_model
    was = gw.manager.model_state(model)
    try:
        await gw.manager.warm(model)
    except ApplianceError as exc:
        return RequestError(409, str(exc), code="cannot_start").response()
    if was == "stopped":
        await audit(request, principal(request).user, "model_start", model, by="warm")
    return JSONResponse(_model_entry(gw, spec), status_code=202)


def _unknown_model(model: str) -> Response:
    return RequestError(
        404, f"The model '{model}' does not exist.", param="model", code="model_not_found"
    ).response()


def _not_installed(model: str) -> Response:
    return RequestError(
        503,
        f"The model '{model}' is in the catalog but not installed on this appliance; "
        f"an administrator can import it with `appliance models import`.",
        type="server_error",
        param="model",
        code="model_not_installed",
    ).response()


@api.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    gw = _state(request)
    spec = gw.catalog.get(model)
    if spec is None:
        return _unknown_model(model)
    return _model_entry(gw, spec)


async def _openai_call(request: Request, path: str) -> Response:
    gw = _state(request)
    raw = await request.body()  # within gateway.max_request_bytes (body_limit.py)
    try:
        body = parse_body(raw)
        spec = validate_request(path, body, gw.catalog)
        check_choices(body, gw.settings.security.max_n)
    except RequestError as exc:
        return exc.response()
    if not spec.installed(gw.settings):
        return _not_installed(spec.name)
    serving = spec.serving_model  # an adapter's requests go to its base model's instances
    base = gw.catalog.get(serving)
    if base is None or not base.installed(gw.settings):
        return _not_installed(serving)
    stream = bool(body.get("stream", False))
    # Of the client's request: a knowledge chat's context, added below, differs per question.
    key = prefix_key(body)
    who = principal(request)

    async def call(watcher) -> Response:
        if path == "/v1/chat/completions" and "knowledge_bases" in body:
            return await grounded_chat(
                request,
                body,
                lambda data, stream: gw.forwarder.forward(
                    path, data, serving, stream, watcher, key, who.user
                ),
            )
        return await gw.forwarder.forward(path, raw, serving, stream, watcher, key, who.user)

    prompt = body.get("messages", body.get("prompt"))
    endpoint = path.removeprefix("/v1/")
    return await observed(request, who, spec.name, endpoint, stream, call, prompt)


@api.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _openai_call(request, "/v1/chat/completions")


@api.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _openai_call(request, "/v1/completions")


@api.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    return await _openai_call(request, "/v1/embeddings")


# ----- admin --------------------------------------------------------------------------------


@admin_api.get("/instances")
async def list_instances(request: Request) -> dict:
    gw = _state(request)
    return {"instances": [i.describe() for i in gw.manager.instances()]}


@admin_api.post("/models/{model}/start")
async def start_model(model: str, request: Request):
    gw = _state(request)
    if model not in gw.catalog:
        return _unknown_model(model)
    model = gw.catalog.get(model).serving_model
    try:
        inst = await gw.manager.launch(model)
    except ApplianceError as exc:
        return RequestError(409, str(exc), code="cannot_start").response()
    await audit(request, principal(request).user, "model_start", model, job_id=inst.job_id)
    return JSONResponse(inst.describe(), status_code=202)


def _instance(request: Request, job_id: int) -> Instance:
    inst = _state(request).manager.get(job_id)
    if inst is None:
        raise RequestError(404, f"No instance with job id {job_id}.")
    return inst


@admin_api.post("/instances/{job_id}/stop")
async def stop_instance(job_id: int, request: Request):
    gw = _state(request)
    inst = _instance(request, job_id)
    try:
        await gw.manager.retire(inst, "stopped by an administrator")
    except ApplianceError as exc:
        message = f"cannot stop instance {job_id}: {exc}"
        return RequestError(502, message, code="cannot_stop").response()
    await audit(request, principal(request).user, "instance_stop", inst.model, job_id=job_id)
    return inst.describe()


@admin_api.post("/instances/{job_id}/park")
async def park_instance(job_id: int, request: Request):
    """Put an idle instance to sleep now: its GPU memory is freed, its job kept, and the next
    request for its model wakes it."""
    inst = _instance(request, job_id)
    await _state(request).manager.park(inst, "parked by an administrator")
    if inst.state is not InstanceState.PARKED:
        why = "it cannot sleep" if not inst.can_sleep else f"it is {inst.state.value}"
        if inst.state is InstanceState.READY and inst.inflight:
            why = f"it has {inst.inflight} request(s) in flight"
        message = f"instance {job_id} was not parked: {why}"
        return RequestError(409, message, code="cannot_park").response()
    await audit(request, principal(request).user, "instance_park", inst.model, job_id=job_id)
    return inst.describe()


@admin_api.post("/instances/{job_id}/drain")
async def drain_instance(job_id: int, request: Request):
    """Move the instance's running streams to other instances, then stop it (maintenance)."""
    inst = _instance(request, job_id)
    await _state(request).manager.drain(inst, "drained by an administrator")
    await audit(request, principal(request).user, "instance_drain", inst.model, job_id=job_id)
    return inst.describe()


@admin_api.post("/instances/{job_id}/move")
async def move_streams(job_id: int, request: Request, streams: int = 1):
    """Move up to `streams` of the instance's running streams to its model's other instances;
    the instance keeps serving."""
    inst = _instance(request, job_id)
    if streams < 1:
        return RequestError(400, "streams must be at least 1.", param="streams").response()
    _state(request).manager.request_moves(inst, streams, forced=True)
    await audit(request, principal(request).user, "instance_move", inst.model, job_id=job_id)
    return inst.describe()
