"""The router: least-loaded and prefix-affine choices among a model's routable instances,
requests counted in and out, and a policy that can be swapped (no Slurm, no event loop)."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.serving.instance import Instance, InstanceState
from appliance.serving.registry import InstanceRegistry
from appliance.serving.routing import LeastLoaded, PrefixAffinity, Router


def registry(*instances: Instance) -> InstanceRegistry:
    reg = InstanceRegistry()
    for inst in instances:
        reg.add(inst)
    return reg


def ready(job_id: int, inflight: int = 0, last_used: float = 0.0, model="tiny") -> Instance:
    url = f"http://n1:{job_id}"
    return Instance(
        job_id, model, InstanceState.READY, 0.0, url=url, inflight=inflight, last_used=last_used
    )


def test_least_loaded_takes_fewest_in_flight_then_the_one_idle_longest():
    a, b, c = ready(1, inflight=2), ready(2, inflight=1, last_used=5.0), ready(3, 1, 3.0)
    assert LeastLoaded().choose([a, b, c]) is c


def test_take_counts_the_request_and_skips_unroutable_excluded_and_other_models():
    busy, unhealthy, excluded = ready(1, inflight=3), ready(2), ready(3)
    unhealthy.state = InstanceState.UNHEALTHY
    router = Router(registry(busy, unhealthy, excluded, ready(4, model="other")))
    assert router.take("tiny", exclude={3}) is busy
    assert busy.inflight == 4 and busy.last_acquired == busy.last_used > 0
    assert router.take("tiny", exclude={1, 3}) is None


def test_release_counts_the_request_out():
    inst = ready(1, inflight=1)
    router = Router(registry(inst))
    router.release(inst)
    router.release(inst)
    assert (inst.inflight, inst.served) == (0, 2)


def test_another_policy_decides_among_the_same_candidates():
    class Busiest:
        def choose(self, candidates: Sequence[Instance], key: str | None = None) -> Instance:
            return max(candidates, key=lambda i: i.inflight)

    idle, busy = ready(1), ready(2, inflight=2)
    assert Router(registry(idle, busy), Busiest()).take("tiny", set()) is busy


def test_prefix_affinity_keeps_a_prefix_on_its_instance_while_its_load_allows():
    a, b = ready(1), ready(2)
    policy = PrefixAffinity(slack=2)
    first = policy.choose([a, b], "conv")
    assert first is LeastLoaded().choose([a, b])
    first.inflight = 2  # busier, within the slack
    assert policy.choose([a, b], "conv") is first
    first.inflight = 3  # past it: least loaded, and the prefix follows
    other = policy.choose([a, b], "conv")
    assert other is not first
    first.inflight = 0
    assert policy.choose([a, b], "conv") is other
    assert policy.choose([a, b], None) is first  # no key: least loaded


def test_prefix_affinity_forgets_gone_instances_and_old_prefixes():
    a, b = ready(1), ready(2)
    policy = PrefixAffinity(capacity=2)
    assert policy.choose([b], "x") is b
    assert policy.choose([a], "x") is a  # its instance is gone: another one takes it
    for key in ("y", "z"):
        policy.choose([a, b], key)
    assert "x" not in policy._owners and len(policy._owners) == 2
