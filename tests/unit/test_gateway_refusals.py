"""Refused requests are counted per (actor, action, reason) and minute, written when the minute
ends (or at shutdown) as one entry each; a flood of distinct actors adds at most MAX_KEYS
entries a minute; the audit chain verifies."""

from __future__ import annotations

from appliance.security.audit import AuditLog

from appliance.gateway.refusals import MAX_KEYS, MAX_NAMED, OTHER, WINDOW_S, Refusals


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_refusals_are_counted_per_key_and_written_when_the_minute_ends(tmp_path):
    log, clock = AuditLog(tmp_path / "audit"), Clock(10 * WINDOW_S + 5)
    refusals = Refusals(log, clock)
    for i in range(1000):
        refusals.count("?", "key_refused", "unknown key", f"10.0.0.{i % 20}", "/v1/me")
    refusals.count("bob", "admin_refused", "not an administrator", "127.0.0.1", "/admin/users")
    assert refusals.flush() == 0 and log.entries() == []  # the minute is still open
    clock.now += WINDOW_S
    refusals.count("?", "key_refused", "unknown key", "10.0.0.1", "/v1/me")  # the next minute
    assert refusals.flush() == 2
    entries = {(e["actor"], e["action"]): e for e in log.entries()}
    unknown = entries[("?", "key_refused")]["detail"]
    assert unknown["count"] == 1000 and unknown["reason"] == "unknown key"
    assert len(unknown["clients"]) == MAX_NAMED and unknown["targets"] == ["/v1/me"]
    assert unknown["window_start"].startswith("1970-01-01T00:10:00") and unknown["window_s"] == 60
    assert entries[("bob", "admin_refused")]["detail"]["count"] == 1
    assert refusals.flush(everything=True) == 1  # at shutdown, the open minute too
    assert len(log.entries()) == 3 and log.verify().ok


def test_distinct_keys_per_minute_are_bounded_the_rest_counted_as_other(tmp_path):
    log, clock = AuditLog(tmp_path / "audit"), Clock(0)
    refusals = Refusals(log, clock)
    flood = 5000
    for i in range(flood):
        refusals.count(f"user{i}", "not_found", "HTTP 404", target="x" * 100_000)
    assert refusals.flush(everything=True) == MAX_KEYS + 1
    entries = log.entries()
    other = [e for e in entries if e["actor"] == OTHER]
    assert len(other) == 1 and other[0]["detail"]["count"] == flood - MAX_KEYS
    assert sum(e["detail"]["count"] for e in entries) == flood
    assert all(len(t) <= 200 for e in entries for t in e["detail"]["targets"])
    assert log.verify().ok
