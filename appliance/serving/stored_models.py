"""The model store as an instance's batch script sees it (StoredModels): the launcher's load
spec, the LoRA adapters' store, and the node where a stored model starts soonest. The store
implements it (appliance/store/for_instances.py); tests may pass their own."""

from __future__ import annotations

from typing import Protocol

from appliance.models.resources import InstanceRequest


class StoredModels(Protocol):
    """What an instance job needs to know of the model store."""

    def load_spec_json(self, model: str) -> str:
        """What the launcher needs to open the stored model `model` (its --store-spec)."""
        ...

    def lora_store_json(self, base: str) -> str:
        """What the launcher needs to open the adapters of `base` (its --lora-store)."""
        ...

    async def place(
        self, model: str, request: InstanceRequest, avoid: frozenset[str]
    ) -> str | None:
        """The node where an instance of `model` starts soonest, on none of the nodes in
        `avoid`; None leaves the choice to Slurm."""
        ...
