"""Where a model's next instance goes: the pinned partition or the preemptible one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from appliance.config import ApplianceSettings
from appliance.models.catalog import Catalog
from appliance.serving.instance import ACTIVE_STATES, Instance


class PartitionChoice(Protocol):
    """Chooses the partition of a model's next instance from the instances it has."""

    def preemptible(self, model: str, instances: Sequence[Instance]) -> bool: ...


class PinnedFirst:
    """A model's first min_instances instances are pinned where batch jobs cannot preempt them;
    those above go to the preemptible partition where the model and the cluster allow it."""

    def __init__(self, settings: ApplianceSettings, catalog: Catalog):
        self.settings = settings
        self.catalog = catalog

    def preemptible(self, model: str, instances: Sequence[Instance]) -> bool:
        spec = self.catalog.get(model)
        if spec is None or not self.settings.cluster.preemptible_partition:
            return False
        allowed = (
            spec.preemptible if spec.preemptible is not None else self.settings.serving.preemptible
        )
        pinned = [i for i in instances if i.state in ACTIVE_STATES and not i.preemptible]
        return allowed and len(pinned) >= spec.min_instances
