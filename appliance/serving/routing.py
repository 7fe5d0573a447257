"""Routing: which of a model's ready instances takes the next request, by a named policy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from appliance.serving.instance import Instance
from appliance.serving.registry import InstanceRegistry


class RoutingPolicy(Protocol):
    """Chooses among a model's routable instances (never empty) the one for the next request.
    A policy that needs the request itself (prefix-aware routing) extends this call."""

    def choose(self, candidates: Sequence[Instance]) -> Instance: ...


class LeastLoaded:
    """Fewest requests in flight; among equals the one idle longest, which spreads load evenly."""

    def choose(self, candidates: Sequence[Instance]) -> Instance:
        return min(candidates, key=lambda i: (i.inflight, i.last_used))


class Router:
    """Takes a ready instance from the registry for each request, chosen by its policy, and
    counts the request in and out."""

    def __init__(self, registry: InstanceRegistry, policy: RoutingPolicy | None = None):
        self.registry = registry
        self.policy = policy or LeastLoaded()

    def take(self, model: str, exclude: set[int]) -> Instance | None:
        """A routable instance of `model` (none in `exclude`) with the request counted on it,
        or None when there is none."""
        ready = [
            i for i in self.registry.instances(model) if i.routable and i.job_id not in exclude
        ]
        if not ready:
            return None
        inst = self.policy.choose(ready)
        inst.inflight += 1
        inst.last_used = inst.last_acquired = time.time()
        return inst

    def release(self, inst: Instance) -> None:
        """A request taken on `inst` has ended."""
        inst.inflight = max(0, inst.inflight - 1)
        inst.last_used = time.time()
        inst.served += 1
