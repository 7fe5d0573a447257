"""Health checks and what they do to a node: drain with the reason, resume only their own."""

from __future__ import annotations

import psutil
from appliance.monitoring.health import (
    CheckResult,
    apply,
    check_gpus,
    check_scratch,
    check_services,
    drain_reason,
)

from appliance.slurm.records import SlurmNode


class RecordingClient:
    def __init__(self):
        self.updates = []

    def update_node(self, name, state, reason=None):
        self.updates.append((name, state, reason))


def test_scratch_full_or_fine(tmp_path):
    ok = check_scratch(tmp_path / "scratch", min_free_percent=0, min_free_bytes=1)
    assert ok.ok and (tmp_path / "scratch").is_dir()
    full = check_scratch(tmp_path / "scratch", min_free_percent=0, min_free_bytes=2**62)
    assert not full.ok and "is full" in full.detail


def test_missing_gpu_devices_fail(tmp_path):
    present = tmp_path / "gpu0"
    present.write_text("")
    results = check_gpus(2, [str(present), str(tmp_path / "gpu1")])
    assert not results[0].ok and "1 of 2 GPUs" in results[0].detail and "gpu1" in results[0].detail
    assert check_gpus(1, [str(present)])[0].ok


def test_required_services_must_run():
    # This test's own process is a service that runs, whatever started pytest.
    results = check_services([psutil.Process().name(), "no-such-daemon"])
    assert [r.ok for r in results] == [True, False]
    assert results[1].detail == "no-such-daemon is not running"


def test_drain_then_resume_only_what_it_drained():
    bad = [CheckResult("scratch /s", False, "/s is full: 0.1 MiB free (0.0%)")]
    good = [CheckResult("scratch /s", True, "1 GiB free")]
    client = RecordingClient()
    idle = SlurmNode("n1", "idle")
    assert apply(client, idle, bad).startswith("n1 drained")
    reason = drain_reason(bad)
    assert client.updates == [("n1", "drain", reason)] and reason.startswith("health:")
    drained = SlurmNode("n1", "idle+drain", reason=reason)
    assert apply(client, drained, bad).startswith("n1 stays drained")
    assert apply(client, drained, good) == "n1 resumed: all checks pass"
    assert client.updates[-1] == ("n1", "resume", None)
    by_admin = SlurmNode("n1", "idle+drain", reason="disk swap on Tuesday")
    client.updates.clear()
    assert apply(client, by_admin, good) == "n1 healthy"
    assert "someone else" in apply(client, by_admin, bad) and client.updates == []
