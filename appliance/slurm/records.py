"""SlurmJob and SlurmNode, and their parsing from `squeue --json` and `sinfo --json`.

Parsing is defensive: Slurm 22.05 prints plain values (``"job_state": "RUNNING"``, times as
integers, ``exit_code`` as a raw wait status), while 23.02 and later print lists for states and
``{"set": .., "number": ..}`` objects for numbers. Both shapes are accepted; a missing field gets
an empty default instead of an exception, so one odd job cannot hide all the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from appliance.slurm.hostlist import HostlistError, expand_hostlist

# Job states in which a job holds or waits for resources (Slurm's "active" states).
ACTIVE_JOB_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)


@dataclass
class SlurmJob:
    """One job as squeue reports it; times are epoch seconds."""

    job_id: int
    name: str
    state: str
    """Base state in capitals: PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, TIMEOUT, ..."""
    reason: str = ""
    """Why a job waits or ended (``Resources``, ``Priority``, ``NonZeroExitCode``); "" for none."""
    nodes: list[str] = field(default_factory=list)
    submit_time: float | None = None
    start_time: float | None = None
    """When the job started; None while pending (Slurm's expected start time is not a start)."""
    comment: str = ""
    tres_alloc: str = ""
    """Allocated trackable resources, e.g. ``cpu=1,mem=1000M,node=1,billing=1``."""
    exit_code: int | None = None
    """Exit status of the batch script once finished: 0-255, or 128+N when killed by signal N."""
    partition: str = ""
    preempt_time: float | None = None
    """When Slurm chose the job for preemption (its grace time began); None if it was not."""
    end_time: float | None = None
    """When the job ends or ended; for a preempted job, the end of its grace time."""
    node_drained: bool = False
    """Its node is drained (or draining). Node state, which squeue does not report: whoever lists
    the job with the nodes' states fills it in; False otherwise."""
    required_nodes: list[str] = field(default_factory=list)
    """The nodes it is pinned to (``--nodelist``: squeue's ``required_nodes``, a hostlist such as
    ``n[1-2]``, expanded); empty when Slurm may place it anywhere. A pending job starts only
    there, so only room made there helps it (serving/eviction.py)."""

    @property
    def active(self) -> bool:
        """Whether the job still waits for, holds or releases resources."""
        return self.state in ACTIVE_JOB_STATES

    @property
    def node(self) -> str:
        """The first allocated node ("" while pending): where a one-node job runs."""
        return self.nodes[0] if self.nodes else ""

    @property
    def grace_end(self) -> float | None:
        """A preempted job's end of grace time, when Slurm stops it; None if not preempted."""
        return self.end_time if self.preempt_time else None


@dataclass
class SlurmNode:
    """One node as sinfo reports it; ``state`` is e.g. ``idle``, ``mixed+drain``, ``down``."""

    name: str
    state: str
    address: str = ""
    cpus: int = 0
    alloc_cpus: int = 0
    real_memory_mb: int = 0
    alloc_memory_mb: int = 0
    gres: str = ""
    """Configured generic resources, e.g. ``gpu:2,shard:8``."""
    gres_used: str = ""
    """Allocated generic resources, e.g. ``gpu:1(IDX:0),shard:0(IDX:N/A)``."""
    reason: str = ""
    """Why the node is drained or down, as the admin or Slurm set it."""
    partitions: list[str] = field(default_factory=list)
    cpu_load: float | None = None
    """The node's load average as slurmd reports it (1-minute, in CPUs)."""

    @property
    def base_state(self) -> str:
        return self.state.split("+", 1)[0]

    @property
    def flags(self) -> list[str]:
        return self.state.split("+")[1:]

    @property
    def drained(self) -> bool:
        """Drained or draining: Slurm schedules nothing new on it."""
        return "drain" in self.flags or self.base_state in ("drain", "drained", "draining")


def _number(value: Any) -> int | None:
    """A plain number, or 23.02+'s ``{"set": true, "infinite": false, "number": N}``."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite", False):
            return None
        value = value.get("number")
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _time(value: Any) -> float | None:
    n = _number(value)
    return float(n) if n else None  # Slurm uses 0 for "not set"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _states(value: Any) -> list[str]:
    """``"RUNNING"`` (22.05) or ``["RUNNING", "COMPLETING"]`` (23.02+) -> list of names."""
    if isinstance(value, list):
        return [str(v) for v in value if v]
    if isinstance(value, str) and value:
        return [value]
    return []


def _exit_code(value: Any) -> int | None:
    """22.05 gives the raw wait status (768 = exit 3, 9 = killed by SIGKILL); 23.02+ an object."""
    if isinstance(value, dict):
        status = _states(value.get("status"))
        signal = _number((value.get("signal") or {}).get("id"))
        if "SIGNALED" in status and signal:
            return 128 + signal
        return _number(value.get("return_code"))
    raw = _number(value)
    if raw is None:
        return None
    if raw & 0x7F:  # terminated by a signal: report it as a shell would
        return 128 + (raw & 0x7F)
    return (raw >> 8) & 0xFF


def _hosts(value: Any) -> list[str]:
    text = _text(value).strip()
    if not text or text in ("(null)", "None"):
        return []
    try:
        return expand_hostlist(text)
    except HostlistError:
        return [text]


def job_from_json(data: dict[str, Any]) -> SlurmJob:
    """One element of ``squeue --json``'s ``jobs`` list."""
    states = _states(data.get("job_state"))
    state = states[0] if states else "UNKNOWN"
    reason = _text(data.get("state_reason"))
    job = SlurmJob(
        job_id=_number(data.get("job_id")) or 0,
        name=_text(data.get("name")),
        state=state,
        reason="" if reason == "None" else reason,
        nodes=_hosts(data.get("nodes")),
        submit_time=_time(data.get("submit_time")),
        start_time=_time(data.get("start_time")),
        comment=_text(data.get("comment")),
        tres_alloc=_text(data.get("tres_alloc_str")),
        partition=_text(data.get("partition")),
        preempt_time=_time(data.get("preempt_time")),
        end_time=_time(data.get("end_time")),
        required_nodes=_hosts(data.get("required_nodes")),
    )
    if state == "PENDING":
        job.start_time = None
    if not job.active:
        job.exit_code = _exit_code(data.get("exit_code"))
    return job


def node_from_json(data: dict[str, Any]) -> SlurmNode:
    """One element of ``sinfo --json``'s ``nodes`` list."""
    states = [s.lower() for s in _states(data.get("state"))]
    flags = [f.lower() for f in _states(data.get("state_flags"))]
    parts = states + [f for f in flags if f not in states]
    return SlurmNode(
        name=_text(data.get("name")),
        state="+".join(parts) or "unknown",
        address=_text(data.get("address")),
        cpus=_number(data.get("cpus")) or 0,
        alloc_cpus=_number(data.get("alloc_cpus")) or 0,
        real_memory_mb=_number(data.get("real_memory")) or 0,
        alloc_memory_mb=_number(data.get("alloc_memory")) or 0,
        gres=_clean_gres(_text(data.get("gres"))),
        gres_used=_clean_gres(_text(data.get("gres_used"))),
        reason=_text(data.get("reason")),
        partitions=[_text(p) for p in data.get("partitions") or []],
        cpu_load=_load_average(data.get("cpu_load")),
    )


def _load_average(value: Any) -> float | None:
    # Slurm reports the load average times 100 as an integer.
    number = _number(value)
    return None if number is None else number / 100


def _clean_gres(text: str) -> str:
    # Untyped GRES print a "(null)" type ("shard:(null):0(IDX:N/A)"); it carries no information.
    return text.replace(":(null)", "")


class SlurmOutputError(ValueError):
    """Slurm printed something other than the JSON expected, or JSON that reports errors."""


def _load(text: str, key: str, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SlurmOutputError(
            f"{what} did not print JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise SlurmOutputError(f"{what} printed JSON that is not an object")
    # With the controller down, 22.05 exits 0 and prints an empty list plus an "errors" entry:
    # reading that as "no jobs" would make every running instance look gone.
    errors = [_describe_error(e) for e in data.get("errors") or []]
    if errors:
        raise SlurmOutputError("; ".join(errors))
    items = data.get(key)
    if not isinstance(items, list):
        raise SlurmOutputError(f"{what} printed JSON without a {key!r} list")
    return [item for item in items if isinstance(item, dict)]


def _describe_error(err: Any) -> str:
    if not isinstance(err, dict):
        return _text(err)
    text = _text(err.get("description") or err.get("error") or "unknown error")
    source = _text(err.get("source"))
    detail = _text(err.get("error")) if err.get("description") else ""
    extra = ", ".join(p for p in (source, detail) if p)
    return f"{text} ({extra})" if extra else text


def parse_squeue_json(text: str) -> list[SlurmJob]:
    """All jobs of a ``squeue --json`` output."""
    return [job_from_json(item) for item in _load(text, "jobs", "squeue --json")]


def parse_sinfo_json(text: str) -> list[SlurmNode]:
    """All nodes of a ``sinfo --json`` output, each once, in Slurm's order."""
    return _unique(node_from_json(item) for item in _load(text, "nodes", "sinfo --json"))


def _unique(nodes: Iterable[SlurmNode]) -> list[SlurmNode]:
    seen: dict[str, SlurmNode] = {}
    for node in nodes:
        seen.setdefault(node.name, node)
    return list(seen.values())


def gpu_count(gres: str) -> int:
    """GPUs in a Slurm GRES string such as `gpu:2,shard:8` or `gpu:a100:4(S:0)`."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total
