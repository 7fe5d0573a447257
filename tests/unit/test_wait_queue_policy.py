"""The wait queue's fairness policy, over snapshots of who waits (no Slurm, no gateway)."""

from __future__ import annotations

from appliance.serving.wait_queue import FairShare, Waiting

POLICY = FairShare()


def refusal(by_user: dict[str, int], user: str, capacity: int = 8) -> str | None:
    return POLICY.refusal(Waiting("m", capacity, by_user), user)


def test_a_user_alone_fills_three_quarters_and_no_more():
    assert refusal({"a": 5}, "a") is None
    assert "kept for other users" in refusal({"a": 6}, "a")


def test_the_last_quarter_is_kept_for_the_others():
    assert refusal({"a": 6}, "b") is None
    assert refusal({"a": 6, "b": 1}, "b") is None
    assert "already wait" in refusal({"a": 6, "b": 2}, "c")


def test_below_an_equal_share_a_user_may_use_the_reserve():
    # Three users: a share is 8 // 3 = 2; b holds 1 and may go on, a (holding 5) may not.
    assert refusal({"a": 5, "b": 1, "c": 1}, "b") is None
    assert refusal({"a": 5, "b": 1, "c": 1}, "a") is not None


def test_a_full_queue_refuses_everyone():
    assert "8 requests already wait" in refusal({"a": 4, "b": 4}, "c")
    assert refusal({"a": 4, "b": 4}, "a") is not None


def test_a_queue_of_one_holds_one_request():
    assert refusal({}, "a", capacity=1) is None
    assert refusal({"a": 1}, "b", capacity=1) is not None


def test_nobody_waiting_admits_anyone():
    assert refusal({}, "") is None
