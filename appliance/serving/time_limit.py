"""No downtime at a Slurm time limit: an instance whose job nears its end starts a successor,
and once the successor serves, hands its streams over (drain: they move by migration) and ends.
Decisions from a snapshot of the instances; the instance manager acts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.serving.instance import InstanceState


@dataclass(frozen=True)
class Ending:
    """An instance as the handover sees it."""

    job_id: int
    state: InstanceState
    ends_at: float | None
    """When Slurm ends its job (start plus time limit); None while unknown."""
    successor_state: InstanceState | None
    """Its successor's state; None when it has none (or the successor is gone)."""


@dataclass(frozen=True)
class StartSuccessor:
    """Start the instance that will take over from `job_id`."""

    job_id: int


@dataclass(frozen=True)
class HandOver:
    """Drain `job_id`: its successor serves."""

    job_id: int


class SuccessorAtTimeLimit:
    """Starts a successor `lead_s` before an instance's job ends (a cold start must fit in
    it), and hands over as soon as the successor is ready."""

    def __init__(self, lead_s: float):
        self.lead_s = lead_s

    def steps(self, now: float, instances: Sequence[Ending]) -> list[StartSuccessor | HandOver]:
        out: list[StartSuccessor | HandOver] = []
        for inst in instances:
            if inst.state not in (InstanceState.READY, InstanceState.UNHEALTHY):
                continue
            if inst.ends_at is None or inst.ends_at - now > self.lead_s:
                continue
            if inst.successor_state is None:
                out.append(StartSuccessor(inst.job_id))
            elif inst.successor_state is InstanceState.READY:
                out.append(HandOver(inst.job_id))
        return out
