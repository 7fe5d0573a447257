"""SlurmClient against output captured from a real Slurm 22.05 cluster (see slurm_replay)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ApplianceError
from appliance.slurm.client import SlurmClient, SlurmJob
from appliance.slurm.runner import CommandError, CommandResult, SlurmCommandError
from tests.unit.slurm_replay import ReplayRunner, capture

CONF = Path("/srv/state/slurm/slurm.conf")


def client(*captures: str) -> tuple[SlurmClient, ReplayRunner]:
    runner = ReplayRunner().replay(*captures)
    return SlurmClient(runner, CONF), runner


def by_role(jobs: list[SlurmJob]) -> dict[str, SlurmJob]:
    """Captured jobs are named <cluster>-<role>; the cluster name differs per capture."""
    return {job.name.split("-", 1)[1]: job for job in jobs}


def test_jobs_in_every_state_are_read_from_squeue_json():
    slurm, runner = client("squeue_mixed")
    jobs = by_role(slurm.jobs())
    assert runner.calls[0].argv == ["squeue", "--json"]
    assert runner.calls[0].env == {"SLURM_CONF": str(CONF)}

    done = jobs["done"]
    assert (done.state, done.exit_code, done.active, done.reason) == ("COMPLETED", 0, False, "")
    assert done.nodes in (["n1"], ["n2"])
    assert done.submit_time and done.start_time and done.start_time >= done.submit_time

    failed = jobs["failed"]
    assert (failed.state, failed.exit_code, failed.reason) == ("FAILED", 3, "NonZeroExitCode")
    # 22.05 reports the raw wait status; a SIGKILLed script reads as the shell's 128 + 9.
    assert jobs["killed"].exit_code == 137

    gpu = jobs["gpu"]
    assert gpu.state == "RUNNING" and gpu.active and gpu.exit_code is None
    assert gpu.comment == "model=tiny-gpu"
    assert gpu.tres_alloc.startswith("cpu=1,mem=1000M,node=1")
    assert len(gpu.nodes) == 1 and gpu.start_time is not None

    assert jobs["shard-a"].state == jobs["shard-b"].state == "RUNNING"
    assert (jobs["cancel-running"].state, jobs["cancel-running"].exit_code) == ("CANCELLED", 143)

    wide = jobs["wide"]
    assert (wide.state, wide.reason, wide.nodes, wide.start_time) == (
        "PENDING",
        "Resources",
        [],
        None,
    )
    assert wide.active and wide.exit_code is None
    assert (jobs["behind"].state, jobs["behind"].reason) == ("PENDING", "Priority")
    cancelled = jobs["cancel-pending"]
    assert (cancelled.state, cancelled.nodes, cancelled.active) == ("CANCELLED", [], False)


def test_jobs_are_filtered_by_name_prefix():
    slurm, _ = client("squeue_mixed")
    prefix = slurm.jobs()[0].name.split("-", 1)[0]
    assert sorted(j.name for j in slurm.jobs(f"{prefix}-shard")) == [
        f"{prefix}-shard-a",
        f"{prefix}-shard-b",
    ]
    assert slurm.jobs("nothing-has-this-name") == []


def test_job_by_id_and_a_job_slurm_forgot():
    slurm, _ = client("squeue_mixed")
    first = slurm.jobs()[0]
    assert slurm.job(first.job_id) == first
    assert slurm.job(999_999) is None


@pytest.mark.parametrize(
    "name,state,role",
    [
        ("squeue_brief_running", "RUNNING", "lookup-running"),
        ("squeue_brief_finished", "COMPLETED", "lookup-done"),
    ],
)
def test_one_jobs_state_and_name_without_reading_every_job(name, state, role):
    slurm, runner = client(name)
    job_id = int(capture(name).argv[-1].removeprefix("--jobs="))
    found_state, found_name = slurm.job_state(job_id)
    assert found_state == state and found_name.endswith(f"-{role}")
    assert "--json" not in runner.calls[0].argv


def test_state_of_a_job_slurm_forgot_is_none():
    slurm, _ = client("squeue_brief_unknown")
    assert slurm.job_state(999_999) is None


def test_multinode_job_has_its_hostlist_expanded():
    slurm, _ = client("squeue_multinode")
    (multi,) = [j for j in slurm.jobs() if j.name.endswith("-multi")]
    assert multi.state == "RUNNING" and multi.nodes == ["n1", "n2"]


def test_a_pinned_job_says_where_it_may_run():
    slurm, _ = client("squeue_pinned_pending")
    jobs = by_role(slurm.jobs())
    # Pinned to n2 (--nodelist=n2), which a job fills: it waits for Resources there, n1 has room.
    pinned = jobs["inst-pinned"]
    assert (pinned.state, pinned.reason, pinned.nodes) == ("PENDING", "Resources", [])
    assert pinned.required_nodes == ["n2"]
    # Slurm prints the list compressed (--nodelist=n1,n2 gives "n[1-2]"): expanded like `nodes`.
    assert jobs["pinned-both"].required_nodes == ["n1", "n2"]
    assert (jobs["inst-idle"].node, jobs["inst-idle"].required_nodes) == ("n1", ["n1"])
    # A job not pinned ("" in the JSON) may run anywhere.
    unpinned, _ = client("squeue_mixed")
    assert all(j.required_nodes == [] for j in unpinned.jobs())


def test_empty_queue():
    slurm, _ = client("squeue_empty")
    assert slurm.jobs() == []


@pytest.mark.parametrize(
    "name,method,words",
    [
        ("squeue_down", "jobs", "reported: Failed while looking for jobs"),
        ("sinfo_down", "nodes", "reported: Unspecified error"),
    ],
)
def test_controller_down_is_an_error_not_an_empty_list(name, method, words):
    # squeue/sinfo --json exit 0 with the controller down; the error is inside the JSON.
    slurm, _ = client(name)
    assert capture(name).returncode == 0
    with pytest.raises(SlurmCommandError) as err:
        getattr(slurm, method)()
    text = str(err.value)
    assert words in text
    assert "not reachable" in text and str(CONF) in text
    assert isinstance(err.value, ApplianceError)


def test_idle_nodes_from_sinfo_json():
    slurm, runner = client("sinfo_idle")
    nodes = slurm.nodes()
    assert runner.calls[0].argv == ["sinfo", "--json"]
    assert [n.name for n in nodes] == ["n1", "n2"]
    n1 = nodes[0]
    assert (n1.state, n1.address, n1.cpus, n1.alloc_cpus) == ("idle", "127.0.0.1", 2, 0)
    assert n1.real_memory_mb > 0 and n1.alloc_memory_mb == 0
    assert n1.gres == "gpu:2,shard:8"
    assert n1.gres_used == "gpu:0,shard:0(IDX:N/A)"  # Slurm's "(null)" type is dropped
    assert not n1.drained and n1.reason == ""


def test_busy_and_drained_nodes():
    slurm, _ = client("sinfo_drained")
    nodes = {n.name: n for n in slurm.nodes()}
    n2 = nodes["n2"]
    assert n2.state == "mixed+drain" and n2.base_state == "mixed" and n2.flags == ["drain"]
    assert n2.drained and n2.reason == "captured drain"
    assert n2.alloc_cpus == 1 and n2.alloc_memory_mb == 100
    n1 = nodes["n1"]
    assert n1.state == "allocated" and n1.alloc_cpus == 2
    assert n1.gres_used.startswith("gpu:1(IDX:") or n1.gres_used.startswith("gpu:1,")


def test_submit_sends_the_script_on_stdin_and_returns_the_job_id():
    slurm, runner = client("sbatch_ok")
    script = "#!/bin/bash\ntrue\n"
    assert slurm.submit(script) == int(capture("sbatch_ok").stdout)
    call = runner.calls[0]
    assert call.argv == ["sbatch", "--parsable"] and call.input == script
    assert call.env == {"SLURM_CONF": str(CONF)}


def test_submit_reads_the_id_in_the_multi_cluster_form():
    # sbatch --parsable prints "<id>;<cluster>" when the cluster is named (Slurm's documentation).
    runner = ReplayRunner().answer(
        ["sbatch", "--parsable"], CommandResult(["sbatch"], 0, "42;other\n", "")
    )
    assert SlurmClient(runner).submit("#!/bin/sh\n") == 42


@pytest.mark.parametrize(
    "name,words",
    [
        ("sbatch_unsatisfiable", "Requested node configuration is not available"),
        ("sbatch_no_shebang", "This does not look like a batch script"),
    ],
)
def test_rejected_submission_quotes_slurm(name, words):
    slurm, _ = client(name)
    with pytest.raises(SlurmCommandError) as err:
        slurm.submit("#!/bin/sh\n")
    assert "`sbatch --parsable` failed (exit 1)" in str(err.value)
    assert words in str(err.value) and err.value.returncode == 1
    assert "not reachable" not in str(err.value)  # the controller answered


def test_cancelling_finished_or_unknown_jobs_is_not_an_error():
    done = capture("scancel_finished").argv[-1]
    slurm, runner = client("scancel_finished", "scancel_unknown", "scancel_signal_finished")
    slurm.cancel(int(done))
    slurm.cancel(999999)
    slurm.cancel(int(done), signal="TERM")  # exits 1 with "Invalid job id specified"
    assert [c.argv for c in runner.calls] == [
        ["scancel", done],
        ["scancel", "999999"],
        ["scancel", "--signal=TERM", done],
    ]


def test_other_cancel_failures_raise():
    failure = CommandResult(["scancel"], 1, "", "scancel: error: Access/permission denied\n")
    runner = ReplayRunner().answer(["scancel", "5"], failure)
    with pytest.raises(SlurmCommandError, match="permission denied"):
        SlurmClient(runner).cancel(5)


def test_ping():
    assert client("scontrol_ping_up")[0].ping() is True
    assert client("scontrol_ping_down")[0].ping() is False


def test_ping_of_a_hung_controller_is_false():
    timeout = CommandError(["scontrol", "ping"], "did not finish within 30 s", timed_out=True)
    runner = ReplayRunner().answer(["scontrol", "ping"], timeout)
    assert SlurmClient(runner).ping() is False


def test_missing_slurm_tools_are_reported_as_such():
    missing = CommandError(["squeue", "--json"], "failed: program not found")
    runner = ReplayRunner().answer(["squeue", "--json"], missing)
    with pytest.raises(SlurmCommandError, match="not installed"):
        SlurmClient(runner).jobs()


def test_update_node():
    slurm, runner = client("scontrol_update_resume", "scontrol_update_unknown_node")
    slurm.update_node("n2", "resume")
    assert runner.calls[-1].argv == ["scontrol", "update", "NodeName=n2", "State=resume"]
    with pytest.raises(SlurmCommandError, match="Invalid node name specified"):
        slurm.update_node("n9", "resume")


def test_drain_always_carries_a_reason():
    runner = ReplayRunner()
    for argv in (
        ["scontrol", "update", "NodeName=n1", "State=drain", "Reason=set by appliance"],
        ["scontrol", "update", "NodeName=n1", "State=drain", "Reason=gpu health check failed"],
    ):
        runner.answer(argv, CommandResult(argv, 0, "", ""))
    slurm = SlurmClient(runner)
    slurm.update_node("n1", "drain")
    slurm.update_node("n1", "drain", "gpu health check failed")
    assert len(runner.calls) == 2


def test_without_slurm_conf_the_environment_is_left_alone():
    runner = ReplayRunner().replay("squeue_empty")
    SlurmClient(runner).jobs()
    assert runner.calls[0].env is None
