"""The gateway's books of instances: each model's instances by job id, and their start failures."""

from __future__ import annotations

import asyncio
from collections import deque

from appliance.serving.instance import COMING_STATES, Instance, InstanceState

# After this many consecutive start failures of a model, requests fail fast for a while
# instead of each launching another job that will fail the same way.
START_FAILURES_BEFORE_COOLDOWN = 3
START_FAILURE_COOLDOWN_S = 60.0


class StartFailures:
    """When each model's instances last failed to start, and why the latest one did."""

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}
        self._last_error: dict[str, str] = {}

    def record(self, model: str, message: str, now: float) -> None:
        self._times.setdefault(model, deque(maxlen=10)).append(now)
        self._last_error[model] = message

    def clear(self, model: str) -> None:
        """An instance of `model` became ready: earlier failures no longer count."""
        self._times.pop(model, None)
        self._last_error.pop(model, None)

    def recent(self, model: str, now: float) -> list[float]:
        """The failures within the cooldown before `now`."""
        cutoff = now - START_FAILURE_COOLDOWN_S
        return [t for t in self._times.get(model, ()) if t >= cutoff]

    def last_error(self, model: str) -> str:
        return self._last_error.get(model, "unknown")


class InstanceRegistry:
    """Every instance the gateway knows, by job id; tells waiters when any of them changes."""

    def __init__(self) -> None:
        self._instances: dict[int, Instance] = {}
        # Set (and replaced) whenever instances change; waiters keep the one they saw. An Event
        # rather than a Condition: Python 3.11's Condition.wait, cancelled by wait_for's timeout
        # under load, can leave its lock released and the waiter fails on exit.
        self._changed = asyncio.Event()
        self.failures = StartFailures()

    def add(self, inst: Instance) -> None:
        self._instances[inst.job_id] = inst

    def remove(self, inst: Instance) -> None:
        del self._instances[inst.job_id]

    def instances(self, model: str | None = None) -> list[Instance]:
        return [i for i in self._instances.values() if model is None or i.model == model]

    def get(self, job_id: int) -> Instance | None:
        return self._instances.get(job_id)

    def model_state(self, model: str) -> str:
        """`running` if any instance is ready, `starting` if one is on its way, `parked` if one
        is asleep, else `stopped`."""
        states = {i.state for i in self.instances(model)}
        if InstanceState.READY in states:
            return "running"
        if states & set(COMING_STATES):
            return "starting"
        if InstanceState.PARKED in states:
            return "parked"
        return "stopped"

    def changed(self) -> asyncio.Event:
        """Set at the next change of any instance (a new one ready, one draining, ...)."""
        return self._changed

    def notify(self) -> None:
        """Wake everyone waiting on `changed`; later waiters get a fresh event."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
