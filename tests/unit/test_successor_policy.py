"""The handover at a time limit, from plain snapshots: a successor starts within the lead
time, the handover waits until the successor is ready, and nothing happens early."""

from __future__ import annotations

from appliance.serving.instance import InstanceState
from appliance.serving.time_limit import Ending, HandOver, StartSuccessor, SuccessorAtTimeLimit

READY, STARTING = InstanceState.READY, InstanceState.STARTING
POLICY = SuccessorAtTimeLimit(lead_s=300)


def test_a_successor_starts_within_the_lead_then_the_instance_hands_over():
    assert POLICY.steps(0, [Ending(1, READY, 301, None)]) == []
    assert POLICY.steps(0, [Ending(1, READY, 299, None)]) == [StartSuccessor(1)]
    assert POLICY.steps(0, [Ending(1, READY, 200, STARTING)]) == []
    assert POLICY.steps(0, [Ending(1, READY, 100, READY)]) == [HandOver(1)]


def test_no_time_limit_or_not_serving_means_nothing_to_do():
    assert POLICY.steps(0, [Ending(1, READY, None, None)]) == []
    assert POLICY.steps(0, [Ending(1, InstanceState.DRAINING, 10, READY)]) == []
    assert POLICY.steps(0, [Ending(1, STARTING, 10, None)]) == []
