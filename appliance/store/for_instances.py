"""The store's side of an instance job (serving.stored_models.StoredModels): load specs from
this stack's keys, and placement by start-up time asked of the nodes' store services."""

from __future__ import annotations

import logging

import aiohttp

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.resources import InstanceRequest
from appliance.slurm.client import SlurmClient
from appliance.store.keyring import load_spec
from appliance.store.lora import lora_store_json
from appliance.store.placement import place

log = logging.getLogger(__name__)


class StoreForInstances:
    """The model store of these settings, its nodes' services asked through `probe`."""

    def __init__(
        self, settings: ApplianceSettings, slurm: SlurmClient, probe: aiohttp.ClientSession
    ):
        self.settings = settings
        self.slurm = slurm
        self.probe = probe

    def load_spec_json(self, model: str) -> str:
        return load_spec(self.settings, model).to_json()

    def lora_store_json(self, base: str) -> str:
        return lora_store_json(self.settings, base)

    async def place(
        self, model: str, request: InstanceRequest, avoid: frozenset[str]
    ) -> str | None:
        try:
            node, ranking = await place(
                self.settings, self.slurm, self.probe, model, request, avoid
            )
        except ApplianceError as exc:
            # Without an estimate the instance still starts, where Slurm puts it.
            log.warning("placement of %s skipped: %s", model, exc)
            return None
        if ranking:
            log.info(
                "placing %s on %s; estimates: %s",
                model,
                node or "any node (Slurm decides)",
                "; ".join(e.describe() for e in ranking),
            )
        return node
