"""Who may wait for a model's instance: a bounded wait queue shared fairly between users. A policy
over a snapshot of who waits; the instance manager keeps the counts and refuses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from appliance.errors import ApplianceError


class WaitQueueFull(ApplianceError):
    """No more requests of this user may wait for an instance of the model (HTTP 429)."""

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(f"{reason}; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Waiting:
    """The requests waiting for an instance of one model, as the policy sees them."""

    model: str
    capacity: int
    """gateway.max_waiting_requests."""
    by_user: Mapping[str, int]


class WaitQueuePolicy(Protocol):
    """Why a request of `user` may not join the wait (None: it may)."""

    def refusal(self, waiting: Waiting, user: str) -> str | None: ...


class FairShare:
    """One user may fill the queue only up to three quarters; the last quarter is kept for users
    holding less than an equal share of it among those waiting. A burst of one user (a batch
    script, say) so never takes the whole queue from the others, and a user alone still gets
    most of it."""

    def refusal(self, waiting: Waiting, user: str) -> str | None:
        total, mine = sum(waiting.by_user.values()), waiting.by_user.get(user, 0)
        if total >= waiting.capacity:
            return f"{total} requests already wait for an instance of {waiting.model}"
        users = len(set(waiting.by_user) | {user})
        # Alone, a user's share is half: the reserve still lets them reach three quarters.
        share = max(1, waiting.capacity // max(2, users))
        reserve = waiting.capacity // 4
        if mine >= share and total >= waiting.capacity - reserve:
            return (
                f"{user or 'this user'} has {mine} of the {total} requests waiting for an "
                f"instance of {waiting.model}; the rest of the queue is kept for other users"
            )
        return None
