"""Monitoring overhead, on a 2-node local cluster with 2 running tiny-model instances:

- in a gateway under load: the gateway as started (collectors on) and a second gateway on the
  same cluster and instances with `monitoring.enabled: false` serve the same rounds of 64
  streams, alternating which goes first (a quiet second before each); the figures are
  monitoring's share of one core in the loaded gateway (per pair of rounds: the gateway's CPU
  with it, less its tokens at the cost per token of the one without it, over the round's wall
  time; the median of the pairs; the figure with a target), the gateway's CPU per token (on /
  off) and the tokens/s ratio (the geometric mean of the paired rounds, which cancels the
  order; marked inconclusive when the rounds swing, as they do where the few cores are shared
  by everything);
- the collectors alone: their CPU share of one core at their intervals, run in this process as
  the gateway runs them (one thread, a 1 s tick), with the defaults and with everything every
  second;
- /metrics scrape latency, against the same gateway's /health.

Run: .venv/bin/python -m benchmarks.monitoring_overhead [--seconds 60] [--rounds 16]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time

import httpx
from appliance.monitoring.history import History
from appliance.monitoring.monitor import Monitor
from appliance.monitoring.sources import gateway_sources
from appliance.monitoring.vllm_metrics import Target

from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import free_port, running_gateway
from benchmarks.common import (
    MODEL,
    median,
    percentile,
    print_table,
    tiny_cluster_stack,
    write_result,
)
from benchmarks.gateway_overhead import cpu_seconds as gateway_cpu_seconds
from benchmarks.gateway_overhead import listener, throughput

# Monitoring may take at most this share of one core: the collectors alone, and what it adds to
# a gateway streaming 64 answers. (Tokens/s through each gateway is reported too, but on a
# machine whose few cores the instances, both gateways and the load share, its paired rounds
# swing by several times: no evidence either way.)
CPU_TARGET = 0.01
SCRAPE_TARGET_MS = 50.0
QUIET_S = 1.0


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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


def gateways_under_load(url: str, settings, args) -> dict:
    """The gateway at `url` (collectors on) and one started here on the same cluster with them
    off, in paired rounds of `args.streams` streams (alternating which goes first)."""
    off_config = settings.model_dump()
    off_config["gateway"]["port"] = free_port()
    off_config["monitoring"]["enabled"] = False
    off_settings = type(settings).model_validate(off_config)
    # Last in the run: on exit it cancels the instances the two gateways share.
    with running_gateway(off_settings) as off:
        procs = {url: listener(url), off: listener(off)}
        for target in procs:  # one untimed round each: connections, vLLM's batch shapes
            asyncio.run(throughput(target, args.streams, args.tokens))
        tps: dict[str, list[float]] = {url: [], off: []}
        cpu_us: dict[str, list[float]] = {url: [], off: []}
        # Per round: (gateway CPU seconds, tokens, wall seconds).
        spent: dict[str, list[tuple[float, int, float]]] = {url: [], off: []}
        failed: list[str] = []
        for i in range(args.rounds):
            for target in (url, off) if i % 2 == 0 else (off, url):
                # vLLM's CPU threads spin for a while after a batch: the second of a pair would
                # find them busy.
                time.sleep(QUIET_S)
                t0, cpu0 = time.perf_counter(), gateway_cpu_seconds([procs[target]])
                rate, bad, tokens = asyncio.run(throughput(target, args.streams, args.tokens))
                cpu = gateway_cpu_seconds([procs[target]]) - cpu0
                spent[target].append((cpu, tokens, time.perf_counter() - t0))
                tps[target].append(round(rate, 1))
                cpu_us[target].append(round(cpu / max(tokens, 1) * 1e6, 2))
                failed += bad
    paired = [a / b for a, b in zip(tps[url], tps[off], strict=True)]
    added = [added_cpu_share(on, off_) for on, off_ in zip(spent[url], spent[off], strict=True)]
    # Each order comes equally often: their geometric mean cancels what going first is worth.
    balanced = statistics.geometric_mean(paired)
    on_cpu, off_cpu = median(cpu_us[url]), median(cpu_us[off])
    print_table(
        f"A gateway under load: {args.streams} streams x {args.tokens} tokens, "
        f"{args.rounds} paired rounds",
        [
            ("collectors", "tokens/s (median)", "gateway CPU us/token"),
            ("off", f"{median(tps[off]):.0f}", f"{off_cpu:.1f}"),
            ("on", f"{median(tps[url]):.0f}", f"{on_cpu:.1f}"),
            ("on / off", f"{balanced:.3f}", f"{on_cpu / off_cpu:.2f}"),
        ],
    )
    print(f"monitoring's CPU in the loaded gateway: {median(added):.4f} of a core (median)")
    return {
        "monitoring_cpu_share_under_load": round(median(added), 4),
        "monitoring_cpu_share_under_load_pairs": [round(x, 4) for x in added],
        "tokens_per_s_ratio_on_vs_off": round(balanced, 4),
        "paired_ratios": [round(x, 4) for x in paired],
        # Within 0.8-1.25 every round, or the tokens/s ratio says nothing here.
        "tokens_per_s_ratio_conclusive": all(0.8 <= x <= 1.25 for x in paired),
        "tokens_per_s_on": tps[url],
        "tokens_per_s_off": tps[off],
        "gateway_cpu_us_per_token_on": round(on_cpu, 2),
        "gateway_cpu_us_per_token_off": round(off_cpu, 2),
        "gateway_cpu_ratio_on_vs_off": round(on_cpu / off_cpu, 3) if off_cpu else None,
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "rounds": args.rounds,
        "streams_failed": len(failed),
        "stream_failures": failed[:20],
    }


def added_cpu_share(on: tuple[float, int, float], off: tuple[float, int, float]) -> float:
    """What monitoring adds to a loaded gateway's CPU, as a share of one core, from a pair of
    rounds (CPU seconds, tokens, wall seconds): the gateway without it spends a cost per token;
    the one with it spends that on its own tokens, and the rest is monitoring's. The collectors
    cost CPU per second, whatever the load, so a ratio per token would depend on how many tokens
    the machine streams (many on a GPU, few here)."""
    per_token = off[0] / max(off[1], 1)
    return (on[0] - per_token * on[1]) / on[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tiny_cluster_stack("mon-bench-", nodes=2, max_instances=2) as (url, settings):
        for _ in range(2):
            httpx.post(url + f"/admin/models/{MODEL}/start", timeout=30).raise_for_status()
        ready = wait_for_instances(url, 2)
        nodes = sorted(i["node"] for i in ready)
        targets = [Target(i["job_id"], i["model"], i["node"], i["url"]) for i in ready]
        slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
        rows, results = [("Collectors", "CPU share of one core")], {}

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
            rows.append((name, f"{share:.5f}"))
        print_table(f"Collector CPU at a 1 s tick, {args.seconds:.0f} s each, nodes {nodes}", rows)

        scrape = latencies(url, "/metrics", args.scrapes, {})
        health = latencies(url, "/health", args.scrapes, {})
        size = len(httpx.get(url + "/metrics", timeout=30).content)
        # Last: it ends with the instances cancelled.
        under_load = gateways_under_load(url, settings, args)
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
            **under_load,
            "scrape_ms": round(s50, 2),
            "scrape_p99_ms": round(s99, 2),
            "health_ms": round(h50, 2),
            "scrape_ratio_vs_health": round(s50 / h50, 2),
            "metrics_bytes": size,
            "instances": len(targets),
            "nodes": nodes,
            "collectors": results,
            "targets": {
                "cpu_share_of_core": CPU_TARGET,
                "scrape_ms": SCRAPE_TARGET_MS,
                "monitoring_cpu_share_under_load": CPU_TARGET,
            },
            "met": share < CPU_TARGET
            and s50 < SCRAPE_TARGET_MS
            and under_load["monitoring_cpu_share_under_load"] <= CPU_TARGET,
        },
    )
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
