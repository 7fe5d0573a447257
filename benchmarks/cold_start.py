"""Cold start: from the first request for a stopped model to its first token, by phase.

Baseline, measured in the same run and interleaved with it (round by round, alternating which
goes first): the same vLLM server started directly (no Slurm, no gateway) until its first
token, on the CPUs the instance's server was allowed. The first token is the first chunk with
text (not the role chunk before it). The phases are one run's (the median run's), so they add
up to its total. Run: .venv/bin/python -m benchmarks.cold_start [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import httpx
import psutil

from appliance import envs
from appliance.serving.endpoint import read_endpoint
from appliance_dev.stack import free_port
from benchmarks.common import (
    TINY,
    first_text_chunk,
    median,
    print_table,
    tiny_cluster_stack,
    write_result,
)

BODY = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "stream": True}
TARGET_S = 30.0


def first_token(url: str, model: str, timeout: float = 300, body: dict | None = None) -> float:
    """Seconds from sending a streamed chat request (`body`, else a greeting) to the first
    chunk with text, as the client sees it."""
    return first_text_chunk(url, {**(body or BODY), "model": model}, timeout)[1]


def direct_start(port: int, cpus: set[int] | None = None) -> float:
    """Baseline: start vLLM by hand (on `cpus`, as the instance was) and time from process
    start until its first token."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(TINY),
        "--served-model-name",
        "tiny-chat",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--enforce-eager",
    ]
    env = {**os.environ, **envs.OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        first_token(url, "tiny-chat")
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def appliance_start(url: str, settings) -> tuple[dict, set[int]]:
    """One cold start through the gateway and Slurm, by phase (they add up to the total), and
    the CPUs the instance's server was allowed; the instance is stopped after."""
    t_first = first_token(url, "tiny-chat")
    [inst] = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    p = inst["phases"]
    run = {
        "first_token_s": t_first,
        "slurm_queue_s": p["job_started_at"] - inst["submitted_at"],
        "process_start_s": p["process_started_at"] - p["job_started_at"],
        "model_load_s": p["weights_loaded_at"] - p["process_started_at"],
        "engine_init_s": p["ready_at"] - p["weights_loaded_at"],
        # The rest: the gateway before the job was submitted, and the first token after ready.
        "first_token_after_ready_s": t_first - (p["ready_at"] - inst["submitted_at"]),
    }
    endpoint = read_endpoint(settings.instances_dir, inst["job_id"])
    cpus = set(psutil.Process(endpoint.pid).cpu_affinity()) if endpoint else set()
    httpx.post(f"{url}/admin/instances/{inst['job_id']}/stop", timeout=30)
    deadline = time.monotonic() + 60
    while httpx.get(url + "/admin/instances", timeout=10).json()["instances"]:
        if time.monotonic() > deadline:
            raise RuntimeError("instance did not stop")
        time.sleep(0.5)
    return run, cpus


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs, baseline, cpus = [], [], set()
    with tiny_cluster_stack("cold-start-") as (url, settings):
        for i in range(args.runs):
            # Alternating which goes first, so neither always finds the machine fresher.
            if i % 2:
                baseline.append(direct_start(free_port(), cpus))
            run, cpus = appliance_start(url, settings)
            runs.append(run)
            if not i % 2:
                baseline.append(direct_start(free_port(), cpus))
    keys = list(runs[0])
    # The median run's phases: medians taken phase by phase would not add up to a total.
    middle = sorted(runs, key=lambda r: r["first_token_s"])[(len(runs) - 1) // 2]
    result = {k: round(middle[k], 3) for k in keys}
    result["first_token_s"] = round(median([r["first_token_s"] for r in runs]), 3)
    result["baseline_direct_vllm_first_token_s"] = round(median(baseline), 3)
    result["ratio_vs_direct_vllm"] = round(
        result["first_token_s"] / result["baseline_direct_vllm_first_token_s"], 3
    )
    result["baseline_cpus"] = sorted(cpus)
    result["target_s"] = TARGET_S
    result["meets_target"] = result["first_token_s"] < TARGET_S
    result["runs"] = runs
    result["baseline_runs_s"] = baseline
    path = write_result("cold_start", result)
    rows = [("phase (median run)", "s", "share")]
    for k in keys:
        rows.append((k, f"{middle[k]:.2f}", f"{middle[k] / middle['first_token_s']:.0%}"))
    rows.append(
        (
            "baseline: vLLM started by hand",
            f"{result['baseline_direct_vllm_first_token_s']:.2f}",
            f"ratio {result['ratio_vs_direct_vllm']:.2f}x",
        )
    )
    print_table(f"cold start, tiny model, {args.runs} runs (target < {TARGET_S:g} s)", rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
