"""Routing: which of a model's ready instances takes the next request, by a named policy."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from appliance.serving.instance import Instance
from appliance.serving.registry import InstanceRegistry


class RoutingPolicy(Protocol):
    """Chooses among a model's routable instances (never empty) the one for the next request;
    `key` names the request's prompt prefix (gateway/prefix_key.py), None when it has none."""

    def choose(self, candidates: Sequence[Instance], key: str | None = None) -> Instance: ...


class LeastLoaded:
    """Fewest requests in flight; among equals the one idle longest, which spreads load evenly."""

    def choose(self, candidates: Sequence[Instance], key: str | None = None) -> Instance:
        return min(candidates, key=lambda i: (i.inflight, i.last_used))


class PrefixAffinity:
    """Requests that share a prompt prefix go to the instance that last served it (vLLM's
    prefix cache there already holds it) while that instance has at most `slack` more requests
    in flight than the least loaded one; otherwise, and without a key, least loaded, and the
    prefix follows. Remembers the `capacity` most recent prefixes."""

    def __init__(self, slack: int = 4, capacity: int = 10_000):
        self.slack = slack
        self.capacity = capacity
        self._owners: OrderedDict[str, int] = OrderedDict()
        self._least_loaded = LeastLoaded()

    def choose(self, candidates: Sequence[Instance], key: str | None = None) -> Instance:
        least = self._least_loaded.choose(candidates)
        if key is None:
            return least
        owner = next((c for c in candidates if c.job_id == self._owners.get(key)), None)
        chosen = owner if owner and owner.inflight <= least.inflight + self.slack else least
        self._owners[key] = chosen.job_id
        self._owners.move_to_end(key)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)
        return chosen


POLICIES = {"least_loaded": LeastLoaded, "prefix_affinity": PrefixAffinity}


class Router:
    """Takes a ready instance from the registry for each request, chosen by its policy, and
    counts the request in and out."""

    def __init__(self, registry: InstanceRegistry, policy: RoutingPolicy | None = None):
        self.registry = registry
        self.policy = policy or LeastLoaded()

    def take(self, model: str, exclude: set[int], key: str | None = None) -> Instance | None:
        """A routable instance of `model` (none in `exclude`) with the request counted on it,
        or None when there is none; `key`: the request's prompt prefix."""
        ready = [
            i for i in self.registry.instances(model) if i.routable and i.job_id not in exclude
        ]
        if not ready:
            return None
        inst = self.policy.choose(ready, key)
        inst.inflight += 1
        inst.last_used = inst.last_acquired = time.time()
        return inst

    def release(self, inst: Instance) -> None:
        """A request taken on `inst` has ended."""
        inst.inflight = max(0, inst.inflight - 1)
        inst.last_used = time.time()
        inst.served += 1
