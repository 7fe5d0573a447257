"""The routes of a kept engine: a vLLM server set up on a model's shape with placeholder weights
(`--load-format dummy`) that takes a stored model of that shape while it runs (docs/gpu.md,
"Kept engines"). Added to vLLM's OpenAI server as a `--middleware`:

- `POST /appliance/engine/claim` {"spec": StoreLoadSpec JSON, "model": name}: the model's policy
  checked, the engine woken (weights first), the stored weights loaded into it by each worker
  (appliance/store/engine_weights.py), its KV cache woken and its prefix cache emptied; it then
  answers under the model's name.
- `POST /appliance/engine/release`: the prefix cache emptied, the engine put to sleep at level 2
  (weights dropped, KV cache freed; CUDA graphs kept) where it sleeps, and its first name back.

Only a caller with the engine's token (APPLIANCE_KEPT_ENGINE_TOKEN, set by whoever started it)
gets through: the instance port answers anyone on the cluster's network. Unlike vLLM's own
development endpoints (`/collective_rpc`, `/sleep`), nothing else is opened."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import ssl
import time
import urllib.request
from typing import Any

from appliance import envs
from appliance.errors import ApplianceError
from appliance.store.engine_weights import LOAD_METHOD, WORKER_EXTENSION
from appliance.store.vllm_plugin import StoreLoadSpec

MIDDLEWARE = f"{__name__}.kept_engine_routes"
CLAIM_PATH = "/appliance/engine/claim"
RELEASE_PATH = "/appliance/engine/release"
ROUTES_PREFIX = "/appliance/engine/"


def server_args() -> list[str]:
    """vLLM server arguments that make a server a kept engine (with `--load-format dummy` on the
    shape's files, and `--enable-sleep-mode` where the device sleeps)."""
    return ["--worker-extension-cls", WORKER_EXTENSION, "--middleware", MIDDLEWARE]


def call(
    base_url: str,
    path: str,
    token: str,
    body: dict,
    context: ssl.SSLContext | None = None,
    timeout: float = 600,
) -> bytes:
    """POST to one of a kept engine's routes (the launcher's claim, the standby's release); its
    answer's body. A refusal raises urllib's HTTPError (an OSError, as an engine gone is)."""
    request = urllib.request.Request(
        base_url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
        return reply.read()


class KeptEngine:
    """One server's claim state: the name it was started under, and whether a failed load left
    it with a mix of two models' weights (then only a restart mends it)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # one claim or release at a time
        self.first_name: str | None = None
        self.broken = False

    async def claim(self, state: Any, spec_json: str, model: str) -> dict:
        client = state.engine_client
        spec = StoreLoadSpec.from_dict(json.loads(spec_json))
        started = time.perf_counter()
        # The policy (user, host, signature) first: a refusal leaves the engine as it was.
        await asyncio.to_thread(spec.open)
        asleep = await client.is_sleeping()
        if asleep:
            await client.wake_up(tags=["weights"])
        try:
            seconds = await client.collective_rpc(LOAD_METHOD, args=(spec_json,))
        except BaseException:
            self.broken = True
            raise
        if asleep:
            await client.wake_up(tags=["kv_cache"])
        # What earlier weights computed is not this model's (a level-2 sleep cleared it too);
        # nothing of this model runs yet, so whatever still holds blocks may go.
        await client.reset_prefix_cache(reset_running_requests=True)
        self.serve_as(state, model)
        return {
            "model": model,
            "load_s": round(max(float(s) for s in seconds), 3),
            "claim_s": round(time.perf_counter() - started, 3),
            "woken": asleep,
        }

    async def release(self, state: Any, sleeps: bool) -> dict:
        client = state.engine_client
        if sleeps and await client.is_sleeping():
            # Parked (level 1: its weights in host memory): woken first, so that the idle
            # engine keeps neither the weights in host memory nor anything on its GPUs.
            await client.wake_up()
        await client.reset_prefix_cache(reset_running_requests=True)  # its job has ended
        if sleeps:
            await client.sleep(level=2)
        if self.first_name is not None:
            self.serve_as(state, self.first_name)
        return {"model": self.first_name, "asleep": sleeps}

    def serve_as(self, state: Any, name: str) -> None:
        """Answer under `name`: vLLM's model list, its checks of a request's model and the
        model named in every answer read this one list (the registry shares it)."""
        paths = state.openai_serving_models.base_model_paths
        if self.first_name is None:
            self.first_name = paths[0].name
        paths[0] = dataclasses.replace(paths[0], name=name)


ENGINE = KeptEngine()


def _authorised(request: Any) -> bool:
    token = envs.APPLIANCE_KEPT_ENGINE_TOKEN
    given = request.headers.get("authorization", "")
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def kept_engine_routes(request: Any, call_next: Any) -> Any:
    """vLLM's `--middleware`: the two routes above; every other request passes on."""
    path = request.url.path
    if not path.startswith(ROUTES_PREFIX):
        return await call_next(request)
    from fastapi.responses import JSONResponse  # vLLM's server has it; the stack need not

    if path not in (CLAIM_PATH, RELEASE_PATH):
        return JSONResponse({"error": f"no route {path}"}, status_code=404)
    if request.method != "POST":
        return JSONResponse({"error": "POST only"}, status_code=405)
    if not _authorised(request):
        return JSONResponse({"error": "not this engine's token"}, status_code=401)
    state = request.app.state
    async with ENGINE.lock:
        if ENGINE.broken:
            return JSONResponse(
                {"error": "a failed load left mixed weights: restart the engine"}, status_code=409
            )
        if path == RELEASE_PATH:
            config = state.engine_client.vllm_config.model_config
            sleeps = bool(getattr(config, "enable_sleep_mode", False))
            return JSONResponse(await ENGINE.release(state, sleeps))
        try:
            body = await request.json()
            spec_json, model = str(body["spec"]), str(body["model"])
            StoreLoadSpec.from_dict(json.loads(spec_json))
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"a claim needs spec and model: {exc}"}, status_code=400)
        try:
            return JSONResponse(await ENGINE.claim(state, spec_json, model))
        except ApplianceError as exc:  # the store's refusal: policy, key, a changed file
            return JSONResponse({"error": str(exc)}, status_code=403)
        except Exception as exc:  # the load failed midway: the engine is not to be served
            return JSONResponse({"error": f"the load failed: {exc}"}, status_code=409)
