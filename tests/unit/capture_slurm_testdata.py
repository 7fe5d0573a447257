"""Capture real Slurm output for the unit tests: run with
``.venv/bin/python -m tests.unit.capture_slurm_testdata`` (root, Slurm installed).

Starts a 2-node local cluster with 2 simulated GPUs (4 shards each) per node on free ports,
puts jobs into many states, and saves what the Slurm tools print under
``tests/unit/testdata/slurm/``: ``<name>.stdout``, ``<name>.stderr`` and, in ``index.json``, the
command and its exit status. Job names are ``<cluster>-<role>`` so tests can find each job.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from appliance.slurm.client import JOB_BRIEF_ARGS, SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import local_cluster_settings, running_local_cluster

OUT = Path(__file__).parent / "testdata" / "slurm"


class Recorder:
    """Runs Slurm commands against one cluster and saves their output verbatim."""

    def __init__(self, slurm_conf: Path, out: Path):
        self.env = {"SLURM_CONF": str(slurm_conf)}
        self.out = out
        self.index: dict[str, dict] = {}
        self.runner = LocalRunner()

    def rec(self, name: str, argv: list[str], note: str, input: str | None = None) -> str:
        result = self.runner.run(argv, input=input, env=self.env, timeout=30)
        (self.out / f"{name}.stdout").write_text(result.stdout)
        (self.out / f"{name}.stderr").write_text(result.stderr)
        self.index[name] = {"argv": argv, "returncode": result.returncode, "note": note}
        print(f"{name}: exit {result.returncode}")
        return result.stdout

    def save(self) -> None:
        (self.out / "index.json").write_text(
            json.dumps(self.index, indent=2, sort_keys=True) + "\n"
        )


def script(name: str, body: str, *options: str) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", "#SBATCH --output=/dev/null"]
    lines += [f"#SBATCH {o}" for o in options]
    return "\n".join([*lines, body, ""])


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("cluster did not reach the expected state")
        time.sleep(0.25)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="slurm-capture-") as tmp,
        running_local_cluster(
            settings := local_cluster_settings(Path(tmp), nodes=2, gpus_per_node=2)
        ) as cluster,
    ):
        capture(settings.cluster.name, cluster.paths.slurm_conf)
        cluster.down()
        rec = Recorder(cluster.paths.slurm_conf, OUT)
        rec.index = json.loads((OUT / "index.json").read_text())
        rec.rec("scontrol_ping_down", ["scontrol", "ping"], "controller stopped")
        rec.rec("squeue_down", ["squeue", "--json"], "controller stopped")
        rec.rec("sinfo_down", ["sinfo", "--json"], "controller stopped")
        rec.save()


def capture(prefix: str, conf: Path) -> None:
    rec = Recorder(conf, OUT)
    slurm = SlurmClient(LocalRunner(), conf)
    rec.rec("slurmd_C", ["slurmd", "-C"], "host facts of the capture machine")
    rec.rec("sinfo_idle", ["sinfo", "--json"], "fresh cluster: 2 idle nodes, gpu:2,shard:8 each")
    rec.rec("squeue_empty", ["squeue", "--json"], "no jobs")
    rec.rec("scontrol_ping_up", ["scontrol", "ping"], "controller running")

    def submit(role: str, body: str, *options: str) -> int:
        return slurm.submit(script(f"{prefix}-{role}", body, *options))

    done = submit("done", "true")
    submit("failed", "exit 3")
    submit("killed", "kill -9 $$")
    wait_until(lambda: all(not j.active for j in slurm.jobs(prefix)))
    gpu = submit("gpu", "sleep 300", "--gres=gpu:1", "--comment=model=tiny-gpu")
    submit("shard-a", "sleep 300", "--gres=shard:1", "--mem=100M")
    submit("shard-b", "sleep 300", "--gres=shard:1", "--mem=100M")
    cancelled = submit("cancel-running", "sleep 300", "--mem=100M")
    wait_until(lambda: slurm.job(cancelled).state == "RUNNING")
    slurm.cancel(cancelled)
    # Both nodes' GPUs at once cannot start while one GPU is busy: waits for Resources; the job
    # behind it waits for Priority.
    submit("wide", "sleep 300", "-N2", "--gres=gpu:2", "--mem=100M")
    submit("behind", "sleep 300", "-N2", "--gres=gpu:2", "--mem=100M")
    cancelled_pending = submit("cancel-pending", "sleep 300", "-N2", "--gres=gpu:2")
    slurm.cancel(cancelled_pending)
    wait_until(lambda: slurm.job(gpu).state == "RUNNING")
    wait_until(lambda: all(j.reason for j in slurm.jobs(prefix) if j.state == "PENDING"))
    time.sleep(1)
    rec.rec("squeue_mixed", ["squeue", "--json"], "jobs in many states (names tell roles)")
    rec.rec("sinfo_busy", ["sinfo", "--json"], "GPU and shard jobs running")
    slurm.update_node("n2", "drain", "captured drain")
    rec.rec("sinfo_drained", ["sinfo", "--json"], "n2 drained while running jobs")
    rec.rec("scontrol_show_node", ["scontrol", "show", "node", "-o"], "text form of the same")
    rec.rec("scancel_finished", ["scancel", str(done)], "cancel a completed job")
    rec.rec("scancel_unknown", ["scancel", "999999"], "cancel a job Slurm never had")
    rec.rec("scancel_signal_finished", ["scancel", "--signal=TERM", str(done)], "signal a done job")
    rec.rec(
        "sbatch_ok",
        ["sbatch", "--parsable"],
        "submission on stdin",
        input=script(f"{prefix}-sbatch", "true"),
    )
    rec.rec(
        "sbatch_unsatisfiable",
        ["sbatch", "--parsable"],
        "more GPUs than any node has",
        input=script(f"{prefix}-toomany", "true", "--gres=gpu:3"),
    )
    rec.rec("sbatch_no_shebang", ["sbatch", "--parsable"], "not a batch script", input="sleep 1\n")
    rec.rec(
        "scontrol_update_resume",
        ["scontrol", "update", "NodeName=n2", "State=resume"],
        "resume the drained node",
    )
    rec.rec(
        "scontrol_update_unknown_node",
        ["scontrol", "update", "NodeName=n9", "State=resume"],
        "no such node",
    )
    for job in slurm.jobs():
        if job.active:
            slurm.cancel(job.job_id)
    wait_until(lambda: all(not j.active for j in slurm.jobs()))
    multi = submit("multi", "sleep 300", "-N2", "--mem=100M")
    wait_until(lambda: slurm.job(multi).state == "RUNNING")
    rec.rec("squeue_multinode", ["squeue", "--json"], "a -N2 job running on n[1-2]")
    slurm.cancel(multi)
    wait_until(lambda: not slurm.job(multi).active)
    capture_preemption(rec, slurm, prefix)
    capture_job_lookup(rec, slurm, prefix)
    capture_pinned_pending(rec, slurm, prefix)
    rec.save()


def capture_preemption(rec: Recorder, slurm: SlurmClient, prefix: str) -> None:
    """A preemptible instance job in its grace time: a batch job needs its node."""
    options = ("--partition=appliance-preemptible", "--mem=100M", "--nodelist=n1")
    instance = slurm.submit(script(f"{prefix}-inst-tiny", "sleep 300", *options))
    wait_until(lambda: slurm.job(instance).state == "RUNNING")
    batch = slurm.submit(script(f"{prefix}-batch", "sleep 5", "--exclusive", "--nodelist=n1"))
    wait_until(lambda: slurm.job(instance).preempt_time is not None)
    rec.rec("squeue_preempted", ["squeue", "--json"], "instance job preempted, batch job waiting")
    slurm.cancel(instance)
    slurm.cancel(batch)


def capture_job_lookup(rec: Recorder, slurm: SlurmClient, prefix: str) -> None:
    """One job's state and name (the breaker's check before it stops or reaches a job)."""
    done = slurm.submit(script(f"{prefix}-lookup-done", "true"))
    running = slurm.submit(script(f"{prefix}-lookup-running", "sleep 300", "--mem=100M"))
    wait_until(lambda: slurm.job(running).state == "RUNNING" and not slurm.job(done).active)
    for name, job_id in (("running", running), ("finished", done), ("unknown", 999999)):
        argv = ["squeue", *JOB_BRIEF_ARGS, f"--jobs={job_id}"]
        rec.rec(f"squeue_brief_{name}", argv, f"one {name} job's state and name")
    slurm.cancel(running)


def capture_pinned_pending(rec: Recorder, slurm: SlurmClient, prefix: str) -> None:
    """Jobs pinned with --nodelist (as a store model's instance job is) waiting on a full node
    while the other node has room: squeue's ``required_nodes`` says where each may run."""
    idle = slurm.submit(script(f"{prefix}-inst-idle", "sleep 300", "--mem=100M", "--nodelist=n1"))
    full = slurm.submit(script(f"{prefix}-full", "sleep 300", "--exclusive", "--nodelist=n2"))
    wait_until(lambda: slurm.job(idle).state == slurm.job(full).state == "RUNNING")
    pinned = slurm.submit(
        script(f"{prefix}-inst-pinned", "sleep 300", "--mem=100M", "--nodelist=n2")
    )
    both = slurm.submit(
        script(f"{prefix}-pinned-both", "sleep 300", "-N2", "--mem=100M", "--nodelist=n1,n2")
    )
    wait_until(lambda: slurm.job(pinned).reason and slurm.job(both).reason)
    time.sleep(1)
    rec.rec(
        "squeue_pinned_pending",
        ["squeue", "--json"],
        "n2 full: a job pinned to n2 and a -N2 job pinned to n1,n2 pending; n1 has room",
    )
    for job_id in (both, pinned, full, idle):
        slurm.cancel(job_id)


# Captures added later than the rest, each runnable alone on a fresh cluster.
PARTS = {
    "--preemption-only": capture_preemption,
    "--lookup-only": capture_job_lookup,
    "--pinned-only": capture_pinned_pending,
}


def capture_part(part) -> None:
    """Only one later capture, on a fresh cluster, added to the saved index."""
    with (
        tempfile.TemporaryDirectory(prefix="slurm-capture-") as tmp,
        running_local_cluster(settings := local_cluster_settings(Path(tmp), nodes=2)) as cluster,
    ):
        rec = Recorder(cluster.paths.slurm_conf, OUT)
        rec.index = json.loads((OUT / "index.json").read_text())
        part(rec, SlurmClient(LocalRunner(), cluster.paths.slurm_conf), settings.cluster.name)
        rec.save()


if __name__ == "__main__":
    import sys

    chosen = [part for flag, part in PARTS.items() if flag in sys.argv]
    capture_part(chosen[0]) if chosen else main()
