"""The per-node store service: reports which stored models the node holds in which tier and the
bandwidth it measured for each tier at start; warms models into the page cache; keeps decrypted
models in the node's host-memory tier (LRU under store.host_cache_gib) and hands them to local
instances over a Unix socket (appliance.store.host_cache)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from fastapi import FastAPI, HTTPException

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.store.format import DATA_FILE
from appliance.store.host_cache import HostCacheServer, fill_from_store
from appliance.store.inventory import NodeInventory, measure_bandwidths, scan
from appliance.store.keyring import host_socket_path, load_spec
from appliance.store.tiers import HostTier


def create_app(settings: ApplianceSettings, node: str | None = None) -> FastAPI:
    """The service's app; bandwidths are measured once, when it starts."""
    node = node or socket.gethostname()
    root = settings.store_root
    state: dict = {"bandwidth": {}, "warming": set()}
    budget = int(settings.store.host_cache_gib * 2**30)
    tier = HostTier(budget) if budget else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["bandwidth"] = await asyncio.to_thread(measure_bandwidths, root)
        server = HostCacheServer(tier, host_socket_path(settings, node)).start() if tier else None
        try:
            yield
        finally:
            if server is not None:
                server.close()
            for model_id in tier.holds() if tier else []:
                tier.evict(model_id)

    app = FastAPI(title=f"appliance store service ({node})", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "node": node}

    @app.get("/inventory")
    async def inventory() -> dict:
        host = {m: 1 for m in tier.holds()} if tier else None
        inv: NodeInventory = await asyncio.to_thread(scan, root, node, host)
        inv.bandwidth_gbps = dict(state["bandwidth"])
        return {**inv.to_dict(), "warming": sorted(state["warming"])}

    @app.post("/models/{model_id}/warm", status_code=202)
    async def warm(model_id: str) -> dict:
        path = root / model_id / DATA_FILE
        if "/" in model_id or not path.is_file():
            raise HTTPException(404, f"model {model_id} is not in this node's store")
        if model_id not in state["warming"]:
            state["warming"].add(model_id)
            task = asyncio.get_running_loop().run_in_executor(None, _read_through, path)
            task.add_done_callback(lambda _t: state["warming"].discard(model_id))
        return {"model": model_id, "warming": True}

    @app.post("/models/{model_id}/cache")
    async def cache(model_id: str) -> dict:
        """Decrypt the model into the host tier (evicting the least recently used)."""
        if tier is None:
            raise HTTPException(409, "the host tier is off on this node (store.host_cache_gib)")
        if "/" in model_id or not (root / model_id / DATA_FILE).is_file():
            raise HTTPException(404, f"model {model_id} is not in this node's store")

        def fill():
            stored = load_spec(settings, model_id).open()  # checks the policy for this node
            entry = tier.put(model_id, stored.data_bytes, lambda: fill_from_store(stored))
            tier.release(entry)
            return entry.nbytes

        try:
            nbytes = await asyncio.to_thread(fill)
        except ApplianceError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"model": model_id, "tier": "host", "bytes": nbytes, "holds": tier.holds()}

    @app.delete("/models/{model_id}/cache")
    async def uncache(model_id: str) -> dict:
        if tier is None or not tier.evict(model_id):
            raise HTTPException(404, f"{model_id} is not in the host tier (or is being read)")
        return {"model": model_id, "evicted": True}

    return app


def _read_through(path) -> None:
    """Bring a file into the page cache (ciphertext for encrypted models: nothing decrypted)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while os.read(fd, 16 << 20):
            pass
    finally:
        os.close(fd)
