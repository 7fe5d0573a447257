"""The sign-in lockout's memory is bounded: at most `sign_in_tracked_names` names, the least
recently failed forgotten first; a name no account can have is refused before anything is kept;
the lockout's answer does not repeat the name."""

from __future__ import annotations

import pytest
from appliance.security.users import MAX_USERNAME_LENGTH, UserStore

from appliance.config.gateway import GatewaySettings
from appliance.gateway.auth import AccessRefused, Authenticator
from appliance.gateway.protocol import RequestError

BOUND = 10


@pytest.fixture
def auth(tmp_path) -> Authenticator:
    UserStore(tmp_path / "users.json").add("alice", "alice-password")
    settings = GatewaySettings(sign_in_max_failures=1, sign_in_tracked_names=BOUND)
    return Authenticator(tmp_path / "keys.json", tmp_path / "users.json", settings)


def status(auth: Authenticator, name: str, password: str = "wrong-password") -> int:
    try:
        auth.sign_in(name, password)
    except RequestError as exc:
        return exc.status
    return 200


def test_the_failure_table_keeps_at_most_the_bound_and_forgets_the_oldest(auth):
    names = [f"name{i}" for i in range(BOUND)]
    assert [status(auth, n) for n in names] == [401] * BOUND
    assert [status(auth, n) for n in names] == [429] * BOUND  # all remembered, at the bound
    assert status(auth, "one-more") == 401
    assert status(auth, names[0]) == 401  # the oldest was forgotten to make room ...
    assert [status(auth, n) for n in names[2:]] == [429] * (BOUND - 2)  # ... the others kept
    assert status(auth, "one-more") == 429


def test_a_name_longer_than_any_account_is_refused_before_any_state(auth):
    names = [f"name{i}" for i in range(BOUND)]
    for n in names:
        status(auth, n)
    for length in (MAX_USERNAME_LENGTH + 1, 150_000):
        with pytest.raises(AccessRefused) as refused:
            auth.sign_in("a" * length, "password")
        assert refused.value.status == 400 and "a" * 40 not in refused.value.message
    assert [status(auth, n) for n in names] == [429] * BOUND  # nothing evicted for them
    assert status(auth, "alice", "alice-password") == 200


def test_the_lockout_answer_does_not_echo_the_name(auth):
    name = "z" * MAX_USERNAME_LENGTH
    status(auth, name)
    with pytest.raises(AccessRefused) as locked:
        auth.sign_in(name, "wrong-password")
    assert locked.value.status == 429 and name not in locked.value.message
    assert (locked.value.actor, locked.value.reason) == (name, "locked out")
