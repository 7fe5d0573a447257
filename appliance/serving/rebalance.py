"""Rebalancing: moves streams from a busy instance of a model to an idle one, and consolidates a
model's streams to free an instance, where the cost model (docs/preemption.md) says it pays."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from appliance.models.catalog import ModelSpec
from appliance.serving.instance import ACTIVE_STATES, Instance

if TYPE_CHECKING:
    from appliance.serving.manager import InstanceManager

log = logging.getLogger(__name__)


class Rebalancer:
    """Looks at each model's ready instances once per manager tick."""

    def __init__(self, manager: InstanceManager):
        self.manager = manager
        self.gateway = manager.settings.gateway

    async def tick(self, now: float) -> None:
        if not self.gateway.rebalance:
            return
        for spec in self.manager.catalog:
            ready = [i for i in self.manager.instances(spec.name) if i.routable]
            if len(ready) < 2:
                continue
            busiest = max(ready, key=lambda i: i.inflight)
            idlest = min(ready, key=lambda i: i.inflight)
            gap = busiest.inflight - idlest.inflight
            if gap >= 2 and not busiest.move_quota:
                # Each moving stream goes to the least busy instance: half the gap evens it.
                self.manager.request_moves(busiest, gap // 2)
                log.info(
                    "rebalancing %s: moving up to %d stream(s) from instance %s to %s",
                    spec.name,
                    gap // 2,
                    busiest.job_id,
                    idlest.job_id,
                )
                continue
            await self._consolidate(spec, ready, now)

    async def _consolidate(self, spec: ModelSpec, ready: list[Instance], now: float) -> None:
        """Drain an instance whose few streams the others can take, when it has had no new
        request for a while: its resources go back (to batch work, another model) early."""
        gw = self.gateway
        active = [i for i in self.manager.instances(spec.name) if i.state in ACTIVE_STATES]
        if len(active) <= spec.min_instances:
            return
        total = sum(i.inflight for i in ready)
        if total > (len(ready) - 1) * gw.scale_up_queue_depth / 2:
            return  # the rest would be busy enough to scale up again
        candidates = [
            i
            for i in ready
            if i.inflight
            and len(i.streams) == i.inflight  # every stream can move
            and now - i.last_acquired >= gw.consolidate_after_s
            and all(
                r.worth_moving(spec.max_model_len, gw.rebalance_prefill_speedup) for r in i.streams
            )
        ]
        if not candidates:
            return
        # Preemptible ones first (their resources belong to batch work), then the least busy.
        inst = min(candidates, key=lambda i: (not i.preemptible, i.inflight, -(i.ready_at or 0)))
        pinned = [i for i in active if not i.preemptible and i is not inst]
        if not inst.preemptible and len(pinned) < spec.min_instances:
            return
        await self.manager.drain(inst, "consolidating: the other instances can take its streams")
