"""The per-node store service: reports which stored models the node holds in which tier and the
bandwidth it measured for each tier at start, and warms models into the page cache on request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from fastapi import FastAPI, HTTPException

from appliance.config import ApplianceSettings
from appliance.store.format import DATA_FILE
from appliance.store.inventory import NodeInventory, measure_bandwidths, scan


def create_app(settings: ApplianceSettings, node: str | None = None) -> FastAPI:
    """The service's app; bandwidths are measured once, when it starts."""
    node = node or socket.gethostname()
    root = settings.store_root
    state: dict = {"bandwidth": {}, "warming": set()}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["bandwidth"] = await asyncio.to_thread(measure_bandwidths, root)
        yield

    app = FastAPI(title=f"appliance store service ({node})", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "node": node}

    @app.get("/inventory")
    async def inventory() -> dict:
        inv: NodeInventory = await asyncio.to_thread(scan, root, node)
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
