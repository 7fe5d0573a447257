"""Node health checks: scratch space writable and not full, memory and CPUs as configured,
GPUs present and healthy. Run by Slurm on every node as its HealthCheckProgram: a failing node
is drained with the reason, and resumed once healthy again (only if this check drained it)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil
from appliance.monitoring.nvml import NvmlReader, NvmlUnavailable

from appliance.config import ApplianceSettings
from appliance.slurm.client import SlurmClient
from appliance.slurm.records import SlurmNode

# Drain reasons this check sets start with this, so it never resumes a node an admin drained.
REASON_PREFIX = "health:"
_GRES_FILE = re.compile(r"NodeName=(\S+)\s+Name=gpu\s+File=(\S+)")


@dataclass(frozen=True)
class CheckResult:
    """One check on one node."""

    name: str
    ok: bool
    detail: str


def check_scratch(path: Path, min_free_percent: float, min_free_bytes: int) -> CheckResult:
    """The directory exists (made if missing), takes a small write, and has free space."""
    name = f"scratch {path}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        usage = os.statvfs(path)
    except OSError as exc:
        return CheckResult(name, False, f"{path} is not usable: {exc.strerror}")
    free = usage.f_bavail * usage.f_frsize
    total = usage.f_blocks * usage.f_frsize
    percent = 100.0 * free / total if total else 0.0
    if free < min_free_bytes or percent < min_free_percent:
        return CheckResult(
            name, False, f"{path} is full: {free / 2**20:.1f} MiB free ({percent:.1f}%)"
        )
    try:  # free space is not enough: read-only mounts and broken disks refuse writes
        probe = path / f".health-{os.getpid()}"
        with probe.open("wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        return CheckResult(name, False, f"{path} is not writable: {exc.strerror}")
    return CheckResult(name, True, f"{free / 2**30:.1f} GiB free ({percent:.0f}%)")


def check_memory(min_bytes: int) -> CheckResult:
    total = psutil.virtual_memory().total
    if total < min_bytes:
        return CheckResult(
            "memory", False, f"{total / 2**30:.1f} GiB of memory, {min_bytes / 2**30:.1f} expected"
        )
    return CheckResult("memory", True, f"{total / 2**30:.1f} GiB")


def check_cpus(expected: int) -> CheckResult:
    count = os.cpu_count() or 0
    if count < expected:
        return CheckResult("cpus", False, f"{count} CPUs, {expected} expected")
    return CheckResult("cpus", True, f"{count} CPUs")


def check_services(names: list[str]) -> list[CheckResult]:
    """Each named process is running (matched on the process name or its command's first
    words, so `python -m` services can be named too)."""
    running: set[str] = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        running.add(proc.info.get("name") or "")
        cmdline = proc.info.get("cmdline") or []
        running.update(Path(part).name for part in cmdline[:3])
    return [
        CheckResult(
            f"service {n}", n in running, "running" if n in running else f"{n} is not running"
        )
        for n in names
    ]


def munge_required(slurm_conf: Path | None) -> bool:
    try:
        return "auth/munge" in (slurm_conf.read_text() if slurm_conf else "")
    except OSError:
        return False


def gpu_files(gres_conf: Path | None, node: str) -> list[str]:
    """The GPU device files gres.conf gives the node."""
    if gres_conf is None or not gres_conf.exists():
        return []
    return [f for n, f in _GRES_FILE.findall(gres_conf.read_text()) if n == node]


def check_gpus(expected: int, files: list[str]) -> list[CheckResult]:
    """As many GPU devices as expected are present; through NVML, none reports a fault."""
    results = []
    present = [f for f in files if Path(f).exists()]
    if len(present) < expected:
        missing = sorted(set(files) - set(present)) or [f"{expected - len(present)} GPU(s)"]
        results.append(
            CheckResult("gpus", False, f"{len(present)} of {expected} GPUs; missing {missing}")
        )
    else:
        results.append(CheckResult("gpus", True, f"{len(present)} GPUs"))
    if expected and any(f.startswith("/dev/nvidia") for f in present):
        try:
            reader = NvmlReader().open()
        except NvmlUnavailable as exc:
            return [*results, CheckResult("gpu health", False, str(exc))]
        try:
            for gpu in reader.read():
                faults = gpu.faults()
                results.append(
                    CheckResult(f"gpu {gpu.index}", not faults, "; ".join(faults) or gpu.name)
                )
        finally:
            reader.close()
    return results


def run_checks(
    settings: ApplianceSettings, node: SlurmNode | None, node_name: str
) -> list[CheckResult]:
    """Every check for `node_name` (its Slurm record gives the expected CPUs, memory, GPUs)."""
    mon = settings.monitoring
    results = [
        check_scratch(
            Path(d.format(node=node_name, state_dir=settings.state_dir)),
            mon.min_free_percent,
            mon.min_free_bytes,
        )
        for d in mon.scratch_dirs
    ]
    if mon.min_memory_gb is not None:
        results.append(check_memory(int(mon.min_memory_gb * 2**30)))
    elif node is not None and node.real_memory_mb:
        results.append(check_memory(node.real_memory_mb * 2**20))
    if node is not None and node.cpus:
        results.append(check_cpus(node.cpus))
    services = list(mon.required_services)
    if munge_required(settings.slurm_conf) and "munged" not in services:
        services.append("munged")
    results += check_services(services)
    gres_conf = settings.slurm_conf.with_name("gres.conf") if settings.slurm_conf else None
    files = gpu_files(gres_conf, node_name)
    expected = mon.expected_gpus if mon.expected_gpus is not None else len(files)
    if expected or files:
        results += check_gpus(expected, files)
    return results


def drain_reason(results: list[CheckResult]) -> str | None:
    failed = [r.detail for r in results if not r.ok]
    if not failed:
        return None
    # Slurm keeps reasons short and on one line.
    return (REASON_PREFIX + " " + "; ".join(failed)).replace("\n", " ")[:200]


def apply(client: SlurmClient, node: SlurmNode, results: list[CheckResult]) -> str:
    """Drain the node for failed checks, or resume it if this check drained it and all pass.
    Returns what was done, for the log."""
    reason = drain_reason(results)
    ours = node.reason.startswith(REASON_PREFIX)
    if reason is not None:
        if node.drained and node.reason == reason:
            return f"{node.name} stays drained: {reason}"
        if node.drained and not ours:
            return f"{node.name} is drained by someone else ({node.reason}); also: {reason}"
        client.update_node(node.name, "drain", reason)
        return f"{node.name} drained: {reason}"
    if node.drained and ours:
        client.update_node(node.name, "resume")
        return f"{node.name} resumed: all checks pass"
    return f"{node.name} healthy"
