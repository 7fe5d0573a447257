"""Cold start: from the first request for a stopped model to its first token, by phase.

Baseline, measured in the same run: the same vLLM server started directly (no Slurm, no
gateway) until its first token. Run: .venv/bin/python -m benchmarks.cold_start [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import httpx

from appliance import envs
from appliance.lines import iter_sse_lines
from appliance_dev.stack import free_port
from benchmarks.common import TINY, median, print_table, tiny_stack, write_result

BODY = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "stream": True}
TARGET_S = 30.0


def first_token(url: str, model: str, timeout: float = 300, body: dict | None = None) -> float:
    """Seconds from sending a streamed chat request (`body`, else a greeting) to the first
    content chunk, as the client sees it."""
    request = {**(body or BODY), "model": model, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=timeout) as resp:
        resp.raise_for_status()
        lines = iter_sse_lines(resp)
        for line in lines:
            if line.startswith("data: {") and '"content"' in line:
                elapsed = time.perf_counter() - t0
                for _ in lines:  # drain, so the instance is idle afterwards
                    pass
                return elapsed
    raise RuntimeError("stream ended without a token")


def direct_start(port: int) -> float:
    """Baseline: start vLLM by hand and time request-until-first-token from process start."""
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
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = []
    with tiny_stack("cold-start-") as url:
        for _ in range(args.runs):
            t_first = first_token(url, "tiny-chat")
            [inst] = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
            p = inst["phases"]
            runs.append(
                {
                    "first_token_s": t_first,
                    "slurm_queue_s": p["job_started_at"] - inst["submitted_at"],
                    "process_start_s": p["process_started_at"] - p["job_started_at"],
                    "model_load_s": p["weights_loaded_at"] - p["process_started_at"],
                    "engine_init_s": p["ready_at"] - p["weights_loaded_at"],
                    "first_token_after_ready_s": t_first - (p["ready_at"] - inst["submitted_at"]),
                }
            )
            httpx.post(f"{url}/admin/instances/{inst['job_id']}/stop", timeout=30)
            deadline = time.monotonic() + 60
            while httpx.get(url + "/admin/instances", timeout=10).json()["instances"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("instance did not stop")
                time.sleep(0.5)
    baseline = [direct_start(free_port()) for _ in range(args.runs)]
    keys = list(runs[0])
    result = {k: round(median([r[k] for r in runs]), 3) for k in keys}
    result["baseline_direct_vllm_first_token_s"] = round(median(baseline), 3)
    result["ratio_vs_direct_vllm"] = round(
        result["first_token_s"] / result["baseline_direct_vllm_first_token_s"], 3
    )
    result["target_s"] = TARGET_S
    result["meets_target"] = result["first_token_s"] < TARGET_S
    result["runs"] = runs
    result["baseline_runs_s"] = baseline
    path = write_result("cold_start", result)
    rows = [("phase", "median s", "share")]
    for k in keys:
        rows.append((k, f"{result[k]:.2f}", f"{result[k] / result['first_token_s']:.0%}"))
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
