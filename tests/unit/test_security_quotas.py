"""Quotas per key and per user: the request after the limit is refused with a Retry-After, and
the limit resets (a minute later, the next UTC day, a stream closed)."""

from __future__ import annotations

import pytest
from appliance.security.quotas import QuotaExceeded, Quotas

from appliance.config.security import Limits, SecuritySettings


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_refuse_then_reset():
    clock = Clock()
    quotas = Quotas(SecuritySettings(quotas=Limits(requests_per_minute=2)), clock)
    quotas.admit("alice", "k1", False)
    clock.t += 10
    quotas.admit("alice", "k1", False)
    with pytest.raises(QuotaExceeded, match="2 requests per minute") as refused:
        quotas.admit("alice", "k1", False)
    assert refused.value.retry_after_s == 50
    clock.t += 50.1
    quotas.admit("alice", "k1", False)  # the first request left the window


def test_limits_count_per_user_and_per_key():
    settings = SecuritySettings(
        user_quotas={"bob": Limits(requests_per_minute=3)},
        key_quotas={"k-small": Limits(requests_per_minute=1)},
    )
    quotas = Quotas(settings, Clock())
    quotas.admit("bob", "k-small", False)
    with pytest.raises(QuotaExceeded, match="key k-small"):
        quotas.admit("bob", "k-small", False)
    quotas.admit("bob", "k-other", False)
    quotas.admit("bob", "k-third", False)  # bob's third request in the minute
    with pytest.raises(QuotaExceeded, match="user bob"):
        quotas.admit("bob", "k-fourth", False)
    quotas.admit("carol", "k-other", False)  # no limit for carol


def test_tokens_per_day_reset_at_utc_midnight():
    clock = Clock(1_800_000_000.0)  # 2027-01-15 08:00 UTC
    quotas = Quotas(SecuritySettings(quotas=Limits(tokens_per_day=100)), clock)
    quotas.done(quotas.admit("alice", "", False), tokens=120)
    with pytest.raises(QuotaExceeded, match="100 tokens") as refused:
        quotas.admit("alice", "", False)
    assert refused.value.retry_after_s == 16 * 3600
    clock.t += 16 * 3600
    quotas.admit("alice", "", False)
    assert quotas.usage("user", "alice")[0]["tokens_today"] == 0


def test_concurrent_streams():
    quotas = Quotas(SecuritySettings(quotas=Limits(concurrent_streams=1)), Clock())
    ticket = quotas.admit("alice", "k", True)
    quotas.admit("alice", "k", False)  # plain requests are not streams
    with pytest.raises(QuotaExceeded, match="1 streams open"):
        quotas.admit("alice", "k", True)
    quotas.done(ticket, tokens=5)
    quotas.admit("alice", "k", True)
    usage = {u["kind"]: u for u in quotas.usage()}
    assert usage["user"]["streams_open"] == 1 and usage["key"]["requests_total"] == 3


def test_counters_survive_a_restart(tmp_path):
    path = tmp_path / "usage" / "usage.sqlite3"
    settings = SecuritySettings(quotas=Limits(tokens_per_day=100, concurrent_streams=1))
    clock = Clock()
    quotas = Quotas(settings, clock, path)
    quotas.admit("alice", "k0", True)  # a stream still open when the gateway stops
    quotas.done(quotas.admit("alice", "k1", False), tokens=60)
    quotas.done(quotas.admit("alice", "k2", False), tokens=50)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700

    again = Quotas(settings, clock, path)  # the gateway restarted
    with pytest.raises(QuotaExceeded, match="used its 100 tokens for today"):
        again.admit("alice", "k3", False)
    usage = {(u["kind"], u["name"]): u for u in again.usage()}
    assert usage["user", "alice"]["tokens_today"] == 110
    assert usage["user", "alice"]["requests_total"] == 2  # the open one never ended
    assert usage["key", "k1"]["tokens_today"] == 60 and usage["key", "k2"]["tokens_today"] == 50
    assert usage["user", "alice"]["streams_open"] == 0  # a restart ends every stream

    clock.t += 86_400  # the next UTC day: the total stays, the tokens start again
    tomorrow = Quotas(settings, clock, path)
    tomorrow.admit("alice", "k1", True)
    alice = tomorrow.usage("user", "alice")[0]
    assert alice["tokens_today"] == 0 and alice["requests_total"] == 3


def test_the_refusal_says_which_limit_and_how_to_change_it():
    quotas = Quotas(SecuritySettings(quotas=Limits(tokens_per_day=10)), Clock())
    quotas.done(quotas.admit("bob", "", False), tokens=10)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit("bob", "", False)
    message = str(refused.value)
    assert "user bob used its 10 tokens for today" in message
    assert "security.quotas.tokens_per_day" in message and "00:00 UTC" in message
