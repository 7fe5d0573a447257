"""The partitions of a cluster the appliance configures: batch work, pinned serving and
preemptible serving (standard library only: the installer's planner renders them too)."""

from __future__ import annotations

from appliance.names import BATCH_PARTITION, GRACE_S, PREEMPTIBLE_PARTITION, SERVING_PARTITION

# Batch work and pinned instances share this tier, so neither preempts the other; preemptible
# instances sit below it and are preempted by both.
HIGH_TIER = 10
LOW_TIER = 1


def preemption_lines() -> list[str]:
    """Global preemption settings: jobs of a higher PriorityTier partition preempt jobs of a
    lower one; a preempted job is cancelled after its partition's GraceTime (no accounting
    database is needed, unlike QOS preemption)."""
    return [
        "PreemptType=preempt/partition_prio",
        "PreemptMode=CANCEL",
    ]


def partition_lines(
    serving: str,
    preemptible: str | None,
    grace_s: int,
    batch: str | None,
) -> list[str]:
    """One line per partition; the batch partition (or, without one, the serving one) is the
    default for jobs that name none."""
    # Nodes=ALL: dynamic nodes of a multi-node cluster join every partition as they register.
    common = "Nodes=ALL MaxTime=INFINITE State=UP"
    lines = []
    if batch and batch != serving:
        lines.append(f"PartitionName={batch} {common} Default=YES PriorityTier={HIGH_TIER}")
    default = "NO" if batch and batch != serving else "YES"
    lines.append(f"PartitionName={serving} {common} Default={default} PriorityTier={HIGH_TIER}")
    if preemptible:
        lines += [
            "# Preemptible instances: a batch job that needs their CPUs/GPUs gets them within "
            "GraceTime seconds, in which the gateway moves their requests elsewhere.",
            f"PartitionName={preemptible} {common} Default=NO PriorityTier={LOW_TIER} "
            f"PreemptMode=CANCEL GraceTime={grace_s}",
        ]
    return lines


def default_partition_lines() -> list[str]:
    """The partitions of a cluster with the default `cluster` settings."""
    return partition_lines(SERVING_PARTITION, PREEMPTIBLE_PARTITION, GRACE_S, BATCH_PARTITION)
