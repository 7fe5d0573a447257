"""The prefix-routing workload of benchmarks/conversations.py: a person's pause between turns,
the same under either policy, and the figures over rounds."""

import asyncio

import pytest

from benchmarks import conversations


@pytest.fixture
def pauses(monkeypatch) -> list[float]:
    """The pauses slept, with no server: every answer's first token comes at once."""
    slept: list[float] = []

    def fake_chunk(url, body, timeout):
        return 0.0, 0.01

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(conversations, "first_text_chunk", fake_chunk)
    monkeypatch.setattr(conversations.asyncio, "sleep", fake_sleep)
    return slept


def run(workload: conversations.Workload) -> list[tuple[int, float]]:
    return asyncio.run(conversations.run_conversations("http://unused", workload))


def test_a_pause_comes_between_turns_never_before_the_first(pauses):
    workload = conversations.Workload("m", ["pump", "valve"], turns=3, concurrency=2, think_s=2.0)
    timings = run(workload)
    assert sorted(n for n, _ in timings) == [0, 0, 1, 1, 2, 2]
    assert len(pauses) == 4  # two conversations, two pauses each
    assert all(1.0 <= p <= 3.0 for p in pauses)


def test_the_same_seed_gives_the_same_pauses_and_another_seed_others(pauses):
    names = conversations.topics(4)
    run(conversations.Workload("m", names, 3, 1, think_s=2.0, seed=1))
    first = list(pauses)
    pauses.clear()
    run(conversations.Workload("m", names, 3, 1, think_s=2.0, seed=1))
    assert pauses == first
    pauses.clear()
    run(conversations.Workload("m", names, 3, 1, think_s=2.0, seed=2))
    assert pauses != first


def test_no_pause_makes_a_closed_loop(pauses):
    run(conversations.Workload("m", ["pump"], 4, 1))
    assert pauses == []


def test_the_figures_need_both_policies_and_are_over_every_round():
    def one(policy: str, ttft: list[float], rate: float) -> dict:
        return {
            "policy": policy,
            "ttft_s": ttft,
            "ttft_later_turns_s": ttft[1:],
            "prefix_cache_hit_rate": rate,
        }

    runs = [
        one("least_loaded", [1.0, 0.8, 0.8], 0.2),
        one("prefix_affinity", [1.0, 0.1, 0.1], 0.7),
        one("prefix_affinity", [1.0, 0.2, 0.2], 0.6),
        one("least_loaded", [1.0, 0.1, 0.9], 0.4),
    ]
    out = conversations.summarize(runs)
    assert out["ttft_p50_s"] == {"least_loaded": 0.85, "prefix_affinity": 0.2}
    assert out["prefix_ttft_ratio"] == round(0.2 / 0.85, 3)
    assert out["prefix_cache_hit_rate"] == {"least_loaded": 0.3, "prefix_affinity": 0.65}
