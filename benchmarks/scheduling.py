"""Scheduling on few nodes: room made for a waiting model, prefix-aware routing, no broken streams
at a Slurm time limit. Every figure against a baseline of the same run, rounds interleaved.

- second model: a node full of idle instances of model `big`; the first token for model
  `small` (room is made by stopping the least recently used idle instance), against `small`'s
  plain cold start on an empty node; rounds alternate the two;
- prefix routing: conversations that each begin with their own long document (a knowledge-base
  answer, a pasted file) and go on for a few turns, on two instances, under `prefix_affinity`
  and `least_loaded` (rounds alternate): the client's time to first token, and vLLM's own
  prefix-cache hits over queries (its /metrics);
- time limit: instance jobs with a 4-minute limit; streams running when the successor takes
  over (their engine stalled mid-answer, as the tiny model answers in a second) must finish
  unbroken.

Run: .venv/bin/python -m benchmarks.scheduling [--rounds 2]  (about 15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from appliance.lines import iter_sse_lines
from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists
from appliance_dev.stack import (
    InstanceEngine,
    free_port,
    local_cluster_settings,
    running_gateway,
    running_local_cluster,
)
from benchmarks import conversations
from benchmarks.cold_start import first_token as cold_start_first_token
from benchmarks.common import (
    TINY,
    median,
    percentile,
    print_table,
    trusting_instances,
    write_result,
)

TARGETS = {"second_model_vs_cold_start": "<= 1.2", "prefix_ttft_ratio": "<= 0.8"}


# -- stacks -----------------------------------------------------------------------------------


def catalog_entry(name: str, max_instances: int, extra: str = "") -> str:
    return (
        f"  - name: {name}\n    source: dir:{TINY}\n    kind: chat\n    max_model_len: 512\n"
        f"    max_instances: {max_instances}\n    idle_timeout_s: 0\n{extra}"
    )


@contextlib.contextmanager
def stack(
    catalog: str, nodes: int, gateway: dict | None = None, **sections
) -> Iterator[tuple[str, object]]:
    """A local cluster of `nodes` nodes (2 simulated GPUs each) and a gateway over `catalog`;
    yields (URL, settings) and stops everything."""
    with tempfile.TemporaryDirectory(prefix="scheduling-") as tmp:
        path = Path(tmp) / "catalog.yaml"
        path.write_text("models:\n" + catalog)
        settings = local_cluster_settings(
            Path(tmp) / "state",
            nodes=nodes,
            gpus_per_node=2,
            gateway={"port": free_port(), "park_after_s": 0, **(gateway or {})},
            catalog={"files": [str(path)], "include_presets": False},
            **sections,
        )
        with (
            running_local_cluster(settings),
            running_gateway(settings) as url,
            trusting_instances(settings),
        ):
            yield url, settings


def instances(url: str, model: str | None = None) -> list[dict]:
    data = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    return [i for i in data if model is None or i["model"] == model]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def stop_all(url: str, model: str) -> None:
    for inst in instances(url, model):
        httpx.post(f"{url}/admin/instances/{inst['job_id']}/stop", timeout=60)
    wait(lambda: not instances(url, model), 120, f"{model} to stop")


def first_token(url: str, body: dict) -> float:
    """Seconds to the first content token of `body` streamed, as the client sees it."""
    return cold_start_first_token(url, body["model"], timeout=400, body=body)


def hello(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


# -- second model on a full node ----------------------------------------------------------------


def second_model(rounds: int) -> dict:
    """`small`'s cold start on an empty node against its first token when the node's GPUs are
    held by an idle instance of `big` (both are the tiny model; `big` asks for both GPUs)."""
    gpus = "    resources: {{gpus: {g}, cpus: 1, memory_gb: 3, cpu_fallback: true}}\n"
    catalog = catalog_entry("big", 1, gpus.format(g=2)) + catalog_entry(
        "small", 1, gpus.format(g=1)
    )
    plain, evicting, evicted = [], [], []
    with stack(catalog, nodes=1) as (url, _):
        for _ in range(rounds):
            plain.append(first_token(url, hello("small")))
            stop_all(url, "small")
            first_token(url, hello("big"))  # the node is now full, `big` idle
            evicting.append(first_token(url, hello("small")))
            evicted.append(not instances(url, "big"))
            stop_all(url, "small")
    return {
        "second_model_first_token_s": round(median(evicting), 3),
        "cold_start_first_token_s": round(median(plain), 3),
        "second_model_vs_cold_start": round(median(evicting) / median(plain), 3),
        "runs_second_model_s": [round(x, 3) for x in evicting],
        "runs_cold_start_s": [round(x, 3) for x in plain],
        "big_evicted_every_round": all(evicted),
    }


# -- prefix-aware routing (the workload: benchmarks/conversations.py) ---------------------------


def prefix_round(policy: str, turns: int, think_s: float, seed: int) -> dict:
    catalog = catalog_entry(
        "tiny-chat", 2, "    min_instances: 2\n    resources: {cpus: 1, memory_gb: 3}\n"
    )
    with stack(catalog, nodes=2, gateway={"routing": policy}) as (url, _):
        wait(
            lambda: [i["state"] for i in instances(url)] == ["ready", "ready"],
            300,
            "two ready instances",
        )
        return conversations.measure_round(
            url,
            lambda: [i["url"] for i in instances(url)],
            policy,
            conversations.Workload(
                "tiny-chat", conversations.TOPICS, turns, 4, think_s=think_s, seed=seed
            ),
        )


def prefix_routing(rounds: int, turns: int, think_s: float) -> dict:
    runs = []
    for i in range(rounds):
        for policy in conversations.policy_order(i):
            run = prefix_round(policy, turns, think_s, seed=i)
            runs.append(run)
            p50 = percentile(run["ttft_s"], 50)
            print(f"prefix {policy}: ttft p50 {p50:.3f} s, hits {run['prefix_cache_hit_rate']}")
    return {
        **conversations.summarize(runs),
        "conversations": len(conversations.TOPICS),
        "turns": turns,
        "think_s": think_s,
        "runs": runs,
    }


# -- streams across a time limit ----------------------------------------------------------------


def stream(url: str, out: dict, started: threading.Event, start_after: int = 2) -> None:
    """One long answer, read to its end; records whether it ended with [DONE] and no error."""
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "stream": True,
        "temperature": 0,
        "max_tokens": 200,
        "ignore_eos": True,
    }
    events = 0
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as resp:
            for line in iter_sse_lines(resp):
                if not line.startswith("data: "):
                    continue
                events += 1
                if events == start_after:
                    started.set()
                if line == "data: [DONE]":
                    out["done"] = True
                elif "error" in json.loads(line[6:]):
                    out["error"] = line
                time.sleep(0.05)
    except Exception as exc:  # counted as broken
        out["error"] = repr(exc)
    finally:
        started.set()


def time_limit(streams: int) -> dict:
    """Streams running on an instance when its 4-minute time limit comes; how many break."""
    catalog = catalog_entry("tiny-chat", 1, "    resources: {cpus: 1, memory_gb: 3}\n")
    with stack(
        catalog,
        nodes=2,
        gateway={"successor_lead_s": 150, "consolidate_after_s": 3600},
        serving={"time_limit_min": 4},
    ) as (url, settings):
        first_token(url, hello("tiny-chat"))
        [first] = instances(url)
        engine = InstanceEngine(first["url"])
        results = [{} for _ in range(streams)]
        flags = [threading.Event() for _ in range(streams)]
        threads = [
            threading.Thread(target=stream, args=(url, r, f), daemon=True)
            for r, f in zip(results, flags, strict=True)
        ]
        for t in threads:
            t.start()
        for f in flags:
            f.wait(120)
        engine.stall()  # every stream is under way; the handover must move them
        try:
            for t in threads:
                t.join(timeout=400)
        finally:
            engine.go_on()
        log = (settings.state_dir / "gateway-test.log").read_text()
    broken = [r for r in results if not r.get("done") or r.get("error")]
    return {
        "time_limit_streams": streams,
        "time_limit_streams_broken": len(broken),
        "time_limit_handed_over": f"draining instance {first['job_id']}" in log
        and "handing over" in log,
        "broken_details": broken,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument(
        "--think-s",
        type=float,
        default=2.0,
        help="mean pause between a conversation's turns (0: the next turn at once)",
    )
    args = ap.parse_args()
    if not tiny_model_exists(TINY):
        build_tiny_model(TINY)
    result = {"method": __doc__}
    result.update(second_model(args.rounds))
    result.update(prefix_routing(args.rounds, args.turns, args.think_s))
    result.update(time_limit(args.streams))
    result["targets"] = TARGETS
    path = write_result("scheduling", result)
    rows = [("measure", "value", "target")]
    for key in (
        "second_model_first_token_s",
        "cold_start_first_token_s",
        "second_model_vs_cold_start",
        "prefix_ttft_ratio",
        "prefix_ttft_ratio_later_turns",
        "prefix_ttft_ratio_later_turns_p90",
        "ttft_p50_s",
        "ttft_p90_later_turns_s",
        "prefix_cache_hit_rate",
        "time_limit_streams_broken",
    ):
        rows.append((key, result[key], TARGETS.get(key, "")))
    print_table("scheduling (tiny model, local Slurm)", rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
