"""The prefix-routing workload shared by benchmarks/scheduling.py (tiny model, CPU) and
benchmarks/gpu_serving.py's `prefix` part (a real-size model on a GPU): conversations that each
begin with their own long document (a knowledge-base answer, a pasted file) and go on for a few
turns; the client's time to first token of each turn, vLLM's own prefix-cache hits over queries
(its /metrics), and the figures of `prefix_affinity` against `least_loaded` over rounds.

A person reads an answer and types before the next turn (`think_s`). Without that pause the
workload is a closed loop that flatters least_loaded: the instance that has just answered a
conversation is the one with a request fewer in flight when its next turn comes, the moment
after, so least_loaded keeps the conversation there by accident (measured on an H200: four
instances, prefix-cache hits 0.72 against 0.75, p50 ratio 0.91)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from benchmarks.common import first_text_chunk, median, percentile

SYSTEM = "You are the plant assistant. Answer briefly and cite the document. " * 2
TOPICS = ["pump", "valve", "boiler", "conveyor", "press", "chiller", "mixer", "kiln"]
POLICIES = ("least_loaded", "prefix_affinity")


def topics(count: int, tag: str = "") -> list[str]:
    """`count` conversation topics, each with a document of its own; `tag` sets them apart from
    another tag's, for instances that keep their prefix cache from one round to the next."""
    n = len(TOPICS)
    return [f"{TOPICS[i % n]}{tag}{i // n or ''}" for i in range(count)]


def document(topic: str, lines: int = 7) -> str:
    """A conversation's own long context (7 lines: ~250 tokens of the tiny model's tokenizer)."""
    return "\n".join(
        f"Maintenance log of the {topic} in hall {i % 4}: part {topic[:2].upper()}-{4400 + i} "
        f"checked, seal replaced after {3 + i % 5} months."
        for i in range(lines)
    )


def conversation_turns(topic: str, turns: int, lines: int = 7) -> list[list[dict]]:
    """The message lists of each turn of one conversation (answers are fixed text, as a client
    would send back what it got)."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"{document(topic, lines)}\n\nWhen was the {topic} seal replaced?",
        },
    ]
    out = [list(messages)]
    for n in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"It was replaced in month {n}."},
            {"role": "user", "content": f"And part number {n}?"},
        ]
        out.append(list(messages))
    return out


def prefix_metrics(instance_urls: list[str]) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache, summed over the instances."""
    hits = queries = 0.0
    for url in instance_urls:
        text = httpx.get(url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("vllm:prefix_cache_hits"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


@dataclass(frozen=True)
class Workload:
    """Conversations to run: one per name (its own document), `turns` each, `concurrency` at a
    time; documents of `lines` lines, answers of `max_tokens`; between a conversation's turns a
    pause of `think_s` on average (drawn from half to one and a half of it, seeded: the same
    pauses under each policy)."""

    model: str
    names: list[str]
    turns: int
    concurrency: int
    lines: int = 7
    max_tokens: int = 8
    think_s: float = 0.0
    seed: int = 0


async def run_conversations(url: str, workload: Workload) -> list[tuple[int, float]]:
    """Every conversation's turns in order, `concurrency` conversations at a time; (turn,
    seconds to first token) of each request."""
    gate = asyncio.Semaphore(workload.concurrency)
    out: list[tuple[int, float]] = []

    async def one(index: int, topic: str) -> None:
        async with gate:
            turns = conversation_turns(topic, workload.turns, workload.lines)
            pauses = random.Random(workload.seed * 1_000_003 + index)
            for n, messages in enumerate(turns):
                if n and workload.think_s:
                    await asyncio.sleep(workload.think_s * pauses.uniform(0.5, 1.5))
                # An answer that ends before its first token (a small model sampling its end
                # of text at once) has no time to first token: the run would fail.
                body = {
                    "model": workload.model,
                    "messages": messages,
                    "max_tokens": workload.max_tokens,
                    "ignore_eos": True,
                }
                _, ttft = await asyncio.to_thread(first_text_chunk, url, body, 400)
                out.append((n, ttft))

    await asyncio.gather(*(one(i, t) for i, t in enumerate(workload.names)))
    return out


def measure_round(
    url: str, instance_urls: Callable[[], list[str]], policy: str, workload: Workload
) -> dict:
    """One round of the conversations through the gateway at `url`, which routes by `policy`;
    the prefix-cache hit rate is over this round's queries alone."""
    before = prefix_metrics(instance_urls())
    timings = asyncio.run(run_conversations(url, workload))
    after = prefix_metrics(instance_urls())
    hits, queries = after[0] - before[0], after[1] - before[1]
    return {
        "policy": policy,
        "ttft_s": [round(t, 4) for _, t in timings],
        "ttft_later_turns_s": [round(t, 4) for n, t in timings if n > 0],
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
    }


def policy_order(round_index: int) -> tuple[str, ...]:
    """Rounds alternate which policy goes first, so neither always runs on a warmer stack."""
    return POLICIES if round_index % 2 == 0 else POLICIES[::-1]


def summarize(runs: list[dict]) -> dict:
    """The figures over all rounds (percentiles of every request of a policy, never the best
    round)."""
    by = {name: [r for r in runs if r["policy"] == name] for name in POLICIES}

    def p(policy: str, key: str, q: int = 50) -> float:
        return percentile([t for r in by[policy] for t in r[key]], q)

    def hit_rate(policy: str) -> float | None:
        rates = [r["prefix_cache_hit_rate"] for r in by[policy] if r["prefix_cache_hit_rate"]]
        return round(median(rates), 4) if rates else None

    def ratio(key: str, q: int = 50) -> float:
        return round(p("prefix_affinity", key, q) / p("least_loaded", key, q), 3)

    return {
        "prefix_ttft_ratio": ratio("ttft_s"),
        "prefix_ttft_ratio_later_turns": ratio("ttft_later_turns_s"),
        # The tail: a later turn sent to an instance without its conversation prefills it all
        # again, which the p50 hides while most turns hit under either policy.
        "prefix_ttft_ratio_later_turns_p90": ratio("ttft_later_turns_s", 90),
        "ttft_p50_s": {name: round(p(name, "ttft_s"), 4) for name in by},
        "ttft_p90_later_turns_s": {
            name: round(p(name, "ttft_later_turns_s", 90), 4) for name in by
        },
        "prefix_cache_hit_rate": {name: hit_rate(name) for name in by},
    }
