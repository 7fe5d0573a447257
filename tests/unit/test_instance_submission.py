"""The batch script both cluster ways submit: a stored model is pinned to the node where it
starts soonest, never to a node it is leaving, and a model that is not installed is refused.
Nodes come from captured `sinfo --json`; their store services are real HTTP servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from appliance.config import load_settings
from appliance.models.catalog import ModelResources, ModelSpec
from appliance.serving.job_script import ModelNotInstalled, instance_script
from appliance.slurm.client import SlurmClient
from appliance.store.for_instances import StoreForInstances
from appliance.store.format import HEADER_FILE
from appliance.store.inventory import Holding, NodeInventory
from tests.unit.slurm_replay import ReplayRunner

STORED = ModelSpec(
    name="secret-1b",
    source="store:secret-1b",
    resources=ModelResources(cpus=1, memory_gb=2, cpu_fallback=True),
)


def holding(node: str, tier: str, gbps: float) -> NodeInventory:
    return NodeInventory(node, {STORED.name: Holding(STORED.name, tier, 2 * 10**9)}, {tier: gbps})


# n1 holds the model in host memory (fast), n2 on disk (slow).
INVENTORIES = {"n1": holding("n1", "host", 20.0), "n2": holding("n2", "disk", 1.0)}


async def inventory(request: web.Request) -> web.Response:
    return web.json_response(INVENTORIES[request.match_info["node"]].to_dict())


async def scripts(tmp_path: Path, spec: ModelSpec, avoids: list[frozenset[str]]) -> list[str]:
    app = web.Application()
    app.router.add_get("/{node}/inventory", inventory)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    settings = load_settings(
        state_dir=str(tmp_path),
        store={"services": {n: f"http://127.0.0.1:{port}/{n}" for n in INVENTORIES}},
    )
    slurm = SlurmClient(ReplayRunner().replay("sinfo_idle"), Path("/etc/slurm/slurm.conf"))
    try:
        async with aiohttp.ClientSession() as probe:
            stored = StoreForInstances(settings, slurm, probe)
            return [
                await instance_script(settings, stored, spec, 0, avoid=a, preemptible=True)
                for a in avoids
            ]
    finally:
        await runner.cleanup()


def install(tmp_path: Path) -> None:
    settings = load_settings(state_dir=str(tmp_path))
    STORED.model_dir(settings).mkdir(parents=True)
    (STORED.model_dir(settings) / HEADER_FILE).write_text("{}")


def test_a_stored_model_starts_where_it_loads_fastest_unless_that_node_is_being_left(tmp_path):
    install(tmp_path)
    fastest, leaving_n1 = asyncio.run(scripts(tmp_path, STORED, [frozenset(), frozenset({"n1"})]))
    assert "#SBATCH --nodelist=n1" in fastest and "--exclude" not in fastest
    assert "#SBATCH --nodelist=n2" in leaving_n1 and "#SBATCH --exclude=n1" in leaving_n1
    assert "#SBATCH --partition=appliance-preemptible" in leaving_n1


def test_a_model_without_its_files_is_refused_before_anything_is_asked(tmp_path):
    with pytest.raises(ModelNotInstalled, match="secret-1b is not installed"):
        asyncio.run(scripts(tmp_path, STORED, [frozenset()]))
    assert not (tmp_path / "logs").exists()


class FixedStore:
    """A store that places every model on one node and hands out fixed specs."""

    def __init__(self) -> None:
        self.placed: list[tuple[str, frozenset[str]]] = []

    def load_spec_json(self, model: str) -> str:
        return f'{{"model_id": "{model}"}}'

    def lora_store_json(self, base: str) -> str:
        return f'{{"base": "{base}"}}'

    async def place(self, model, request, avoid):
        self.placed.append((model, avoid))
        return "n9"


def test_the_store_comes_in_as_an_interface(tmp_path):
    """The script asks the store it is given (no Slurm, no store services), and only for a
    stored model; a LoRA base gets its adapters' store."""
    install(tmp_path)
    settings = load_settings(state_dir=str(tmp_path))
    store = FixedStore()
    script = asyncio.run(instance_script(settings, store, STORED, 0, avoid=frozenset({"n1"})))
    assert "#SBATCH --nodelist=n9" in script and "#SBATCH --exclude=n1" in script
    assert """--store-spec '{"model_id": "secret-1b"}'""" in script
    assert store.placed == [("secret-1b", frozenset({"n1"}))]
    plain = ModelSpec(name="chat", source="hf:x/chat", lora=True)
    plain.model_dir(settings).mkdir(parents=True)
    (plain.model_dir(settings) / "config.json").write_text("{}")
    script = asyncio.run(instance_script(settings, store, plain, 0))
    assert "--nodelist" not in script and "--store-spec" not in script
    assert """--lora-store '{"base": "chat"}'""" in script
    assert len(store.placed) == 1
