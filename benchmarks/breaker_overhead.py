"""What the SSH circuit breaker costs a request: the same tiny-model instance reached by a
gateway that talks to Slurm and the instance directly (the baseline, in the same run) and by a
gateway that reaches the cluster only through the breaker (an sshd on loopback with the
ForceCommand key, one shared SSH connection). Both gateways route to the same instance job.

Measured, alternating between the two paths: latency of a 1-token completion (p50, p99), and,
in rounds of `--streams` concurrent streamed answers of `--tokens` tokens each (ignore_eos and
min_tokens: every answer has them all), time to the first token and tokens/s per stream. The
breaker's gateway holds one long-lived session (issue 27). The instance's engine is pinned to
one CPU (InstanceEngine), so answers stream as they are made.

Run: .venv/bin/python -m benchmarks.breaker_overhead [--requests 40 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from appliance.config import ApplianceSettings, load_settings
from appliance.lines import iter_sse_lines
from appliance_dev.stack import (
    InstanceEngine,
    free_port,
    running_breaker_sshd,
    running_gateway,
)
from benchmarks.common import MODEL, percentile, print_table, tiny_cluster_stack, write_result


def one_token(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    resp = client.post(
        url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 1}
    )
    resp.raise_for_status()
    return (time.perf_counter() - started) * 1000


def stream(client: httpx.Client, url: str, tokens: int) -> tuple[float, float]:
    """(ms to the first token, tokens/s after it) of one streamed answer."""
    body = {
        "model": MODEL,
        "prompt": "The plant",
        "max_tokens": tokens,
        "min_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    count = 0
    with client.stream("POST", url + "/v1/completions", json=body) as resp:
        for line in iter_sse_lines(resp):
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    if count != tokens:
        raise RuntimeError(f"a stream had {count} tokens, not {tokens}")
    return (first - started) * 1000, (count - 1) / (end - first)


def web_tier(cluster: ApplianceSettings, breaker: dict, tmp: Path) -> ApplianceSettings:
    """A second gateway's settings: its own state, no Slurm of its own, the breaker on."""
    base = cluster.model_dump(mode="json")
    return load_settings(
        **{
            **base,
            "state_dir": str(tmp / "web"),
            "breaker": breaker,
            "cluster": {**base["cluster"], "mode": "existing", "slurm_conf": str(tmp / "no-slurm")},
            "gateway": {**base["gateway"], "port": free_port()},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    with (
        tiny_cluster_stack("appliance-bench-breaker-") as (direct, cluster),
        tempfile.TemporaryDirectory(prefix="appliance-web-tier-") as tmp,
        running_breaker_sshd(cluster, Path(tmp) / "sshd") as sshd,
    ):
        web = web_tier(cluster, sshd.breaker_section(Path(tmp) / "known_hosts"), Path(tmp))
        with (
            running_gateway(web, timeout=120) as behind,
            httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64)) as c,
            ThreadPoolExecutor(args.streams) as pool,
        ):
            paths = {"direct": direct, "breaker": behind}
            for url in paths.values():  # start the instance, open the session
                one_token(c, url)
                one_token(c, url)
            # The engine on one CPU, its API server on the others: on two cores the engine's
            # busy polling starves the API server, which then sends a whole answer at its end
            # (the tokens/s would measure that, not the path).
            (inst,) = c.get(direct + "/admin/instances").json()["instances"]
            InstanceEngine(inst["url"])
            lat = {name: [] for name in paths}
            for n in range(args.requests):
                # Alternating which path goes first, so neither always follows the other.
                for name in sorted(paths, reverse=n % 2 == 1):
                    lat[name].append(one_token(c, paths[name]))
            ttft = {name: [] for name in paths}
            tps = {name: [] for name in paths}
            for n in range(args.rounds):
                for name in sorted(paths, reverse=n % 2 == 1):
                    url = paths[name]
                    runs = [pool.submit(stream, c, url, args.tokens) for _ in range(args.streams)]
                    for run in runs:
                        first, rate = run.result()
                        ttft[name].append(first)
                        tps[name].append(rate)
    result = {}
    for name in paths:
        result[name] = {
            "p50_ms": round(percentile(lat[name], 50), 2),
            "p99_ms": round(percentile(lat[name], 99), 2),
            "first_token_p50_ms": round(percentile(ttft[name], 50), 2),
            "tokens_per_s_p50": round(percentile(tps[name], 50), 1),
        }
    d, b = result["direct"], result["breaker"]
    result["added_p50_ms"] = round(b["p50_ms"] - d["p50_ms"], 2)
    result["first_token_ratio"] = round(b["first_token_p50_ms"] / d["first_token_p50_ms"], 2)
    result["tokens_per_s_ratio"] = round(b["tokens_per_s_p50"] / d["tokens_per_s_p50"], 3)
    rows = [
        ("measure", "direct (baseline)", "through the breaker", "added / ratio"),
        (
            "1-token completion p50",
            f"{d['p50_ms']} ms",
            f"{b['p50_ms']} ms",
            f"+{result['added_p50_ms']} ms",
        ),
        ("1-token completion p99", f"{d['p99_ms']} ms", f"{b['p99_ms']} ms", ""),
        (
            "first streamed token p50",
            f"{d['first_token_p50_ms']} ms",
            f"{b['first_token_p50_ms']} ms",
            f"{result['first_token_ratio']}x",
        ),
        (
            f"{args.tokens}-token streams x{args.streams}, tokens/s p50",
            d["tokens_per_s_p50"],
            b["tokens_per_s_p50"],
            f"{result['tokens_per_s_ratio']}x",
        ),
    ]
    print_table("The SSH circuit breaker's cost per request (same instance)", rows)
    result.update(
        requests=args.requests, streams=args.streams, rounds=args.rounds, tokens=args.tokens
    )
    print(f"\nresults: {write_result('breaker_overhead', result)}")


if __name__ == "__main__":
    main()
