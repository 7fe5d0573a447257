"""Monitoring overhead: the collectors' CPU share of one core at 1 Hz, and /metrics scrape
latency, on a 2-node local cluster with 2 running tiny-model instances.

The collectors run here, in this process, exactly as the gateway runs them (the same sources,
one thread, a 1 s tick), so their CPU time (this process plus the sinfo/squeue it starts) is
theirs alone. Two configurations: the defaults (components every second, Slurm every 10 s,
instances every 5 s) and everything every second. Baselines, measured in the same run: for CPU,
the cheapest possible collector (one read of /proc/loadavg per second, in the same loop); for
scrape latency, the same gateway's /health.

Run: .venv/bin/python -m benchmarks.monitoring_overhead [--seconds 60]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import httpx
from appliance.monitoring.history import History
from appliance.monitoring.monitor import Monitor, Source
from appliance.monitoring.sources import gateway_sources
from appliance.monitoring.vllm_metrics import Target

from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from benchmarks.common import MODEL, percentile, print_table, tiny_cluster_stack, write_result

CPU_TARGET = 0.01
SCRAPE_TARGET_MS = 50.0


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_loadavg() -> list:
    """The cheapest collector there is: one small read, nothing exposed."""
    Path("/proc/loadavg").read_text()
    return []


def run_monitor(monitor: Monitor, seconds: float) -> tuple[float, dict]:
    """CPU share of one core while `monitor` runs at its tick for `seconds`."""
    monitor.refresh(force=True)  # first readings (NVML open, psutil's first CPU sample)
    cpu0, t0 = cpu_seconds(), time.monotonic()
    monitor.start()
    time.sleep(seconds)
    monitor.stop()
    share = (cpu_seconds() - cpu0) / (time.monotonic() - t0)
    return share, {s["collector"]: s for s in monitor.status()}


def latencies(url: str, path: str, n: int, headers: dict) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as client:
        client.get(url + path, headers=headers)
        for _ in range(n):
            t0 = time.perf_counter()
            response = client.get(url + path, headers=headers)
            response.raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
    return out


def wait_for_instances(url: str, count: int, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        insts = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
        ready = [i for i in insts if i["state"] == "ready"]
        if len(ready) >= count:
            return ready
        time.sleep(2)
    raise RuntimeError(f"{count} instances not ready after {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    with tiny_cluster_stack("mon-bench-", nodes=2, max_instances=2) as (url, settings):
        for _ in range(2):
            httpx.post(url + f"/admin/models/{MODEL}/start", timeout=30).raise_for_status()
        ready = wait_for_instances(url, 2)
        nodes = sorted(i["node"] for i in ready)
        targets = [Target(i["job_id"], i["model"], i["node"], i["url"]) for i in ready]
        slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
        rows, results = [("Collectors", "CPU share of one core", "vs baseline")], {}

        baseline = Monitor([Source("loadavg", "component", read_loadavg)])
        base_share, _ = run_monitor(baseline, args.seconds / 2)
        rows.append(("baseline: /proc/loadavg once a second", f"{base_share:.5f}", "1.0"))

        configs = {
            "defaults": settings,
            "all at 1 Hz": settings.model_copy(
                update={
                    "monitoring": settings.monitoring.model_copy(
                        update={"cluster_interval_s": 1.0, "task_interval_s": 1.0}
                    )
                }
            ),
        }
        for name, config in configs.items():
            sources = gateway_sources(config, slurm, lambda: targets)
            monitor = Monitor(sources, History(), tick_s=1.0, history_step_s=5.0)
            share, status = run_monitor(monitor, args.seconds)
            per = {k: round(v["duration_s"] * 1000, 2) for k, v in status.items()}
            results[name] = {
                "cpu_share_of_core": round(share, 5),
                "last_run_ms": per,
                "up": {k: v["up"] for k, v in status.items()},
            }
            rows.append((name, f"{share:.5f}", f"{share / base_share:.1f}"))
        print_table(f"Collector CPU at a 1 s tick, {args.seconds:.0f} s each, nodes {nodes}", rows)

        scrape = latencies(url, "/metrics", args.scrapes, {})
        health = latencies(url, "/health", args.scrapes, {})
        size = len(httpx.get(url + "/metrics", timeout=30).content)
        s50, s99 = percentile(scrape, 50), percentile(scrape, 99)
        h50, h99 = percentile(health, 50), percentile(health, 99)
        print_table(
            f"GET latency, {args.scrapes} requests each (/metrics is {size} bytes)",
            [
                ("endpoint", "p50 ms", "p99 ms", "p50 vs /health"),
                ("/health (baseline)", f"{h50:.2f}", f"{h99:.2f}", "1.0"),
                ("/metrics", f"{s50:.2f}", f"{s99:.2f}", f"{s50 / h50:.1f}"),
            ],
        )
    share = results["defaults"]["cpu_share_of_core"]
    path = write_result(
        "monitoring_overhead",
        {
            "cpu_share_of_core": share,
            "cpu_share_of_core_all_1hz": results["all at 1 Hz"]["cpu_share_of_core"],
            "cpu_baseline_share_of_core": round(base_share, 5),
            "cpu_ratio_vs_baseline": round(share / base_share, 2) if base_share else None,
            "scrape_ms": round(s50, 2),
            "scrape_p99_ms": round(s99, 2),
            "health_ms": round(h50, 2),
            "scrape_ratio_vs_health": round(s50 / h50, 2),
            "metrics_bytes": size,
            "instances": len(targets),
            "nodes": nodes,
            "collectors": results,
            "targets": {"cpu_share_of_core": CPU_TARGET, "scrape_ms": SCRAPE_TARGET_MS},
            "met": share < CPU_TARGET and s50 < SCRAPE_TARGET_MS,
        },
    )
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
