"""Signed load policies: signing keys, every refusal rule and its message, tampering."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta, timezone

import pytest
from appliance.security.policy import (
    SIGNATURE_DOMAIN,
    LoadPolicy,
    PolicyRefused,
    canonical_json,
    check_policy,
    generate_signing_key,
    load_signing_key,
    public_key_hex,
    sign_policy,
)
from appliance.security.secret_files import SecretFileError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from appliance.errors import ApplianceError

HOST = "hf-0123456789abcdef01234567"
OTHER_HOST = "hf-fedcba9876543210fedcba98"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
SIGNER = KEY.public_key().public_bytes_raw().hex()


def make_policy(**changes) -> LoadPolicy:
    fields = {
        "model_id": "m",
        "users": ["alice"],
        "roles": ["ml-admins"],
        "hosts": [HOST],
        "not_after": datetime(2026, 6, 1, tzinfo=UTC),
        "issued_at": datetime(2026, 1, 1, tzinfo=UTC),
        "issuer": "security-team",
    }
    return LoadPolicy(**{**fields, **changes})


def check(signed, **changes) -> LoadPolicy:
    args = {
        "trusted_signers": [SIGNER],
        "model_id": "m",
        "user": "alice",
        "roles": [],
        "host": HOST,
        "now": NOW,
    }
    return check_policy(signed, **{**args, **changes})


def refusal(signed, **changes) -> PolicyRefused:
    with pytest.raises(PolicyRefused) as err:
        check(signed, **changes)
    assert isinstance(err.value, ApplianceError)
    return err.value


def test_valid_policy_passes():
    policy = make_policy()
    assert check(sign_policy(policy, KEY)) == policy
    # Stored as JSON and read back, it still verifies.
    assert check(json.loads(json.dumps(sign_policy(policy, KEY)))) == policy


def test_signed_form():
    signed = sign_policy(make_policy(), KEY)
    assert set(signed) == {"policy", "signature", "signer"} and signed["signer"] == SIGNER
    assert signed["policy"]["not_after"] == "2026-06-01T00:00:00Z"
    body = signed["policy"]
    assert canonical_json(body) == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    KEY.public_key().verify(
        bytes.fromhex(signed["signature"]), SIGNATURE_DOMAIN + canonical_json(body)
    )


def test_role_grants_access():
    signed = sign_policy(make_policy(), KEY)
    assert check(signed, user="carol", roles=["readers", "ml-admins"]).model_id == "m"


def test_no_users_and_no_roles_means_any_user():
    signed = sign_policy(make_policy(users=[], roles=[]), KEY)
    assert check(signed, user="anyone", roles=[])


def test_no_hosts_means_any_host():
    signed = sign_policy(make_policy(hosts=[]), KEY)
    assert check(signed, host=OTHER_HOST)


def test_no_expiry():
    signed = sign_policy(make_policy(not_after=None), KEY)
    assert check(signed, now=datetime(2999, 1, 1, tzinfo=UTC))


def test_rule_user():
    err = refusal(sign_policy(make_policy(), KEY), user="bob", roles=["readers"])
    assert err.rule == "user"
    assert str(err) == (
        "refused by rule 'user': user 'bob' is not among the allowed users [alice] "
        "and has none of the roles [ml-admins]"
    )


def test_rule_user_with_only_users_or_only_roles():
    err = refusal(sign_policy(make_policy(roles=[]), KEY), user="bob")
    assert str(err) == "refused by rule 'user': user 'bob' is not among the allowed users [alice]"
    err = refusal(sign_policy(make_policy(users=[], roles=["a", "b"]), KEY), user="bob")
    assert str(err) == "refused by rule 'user': user 'bob' has none of the allowed roles [a, b]"


def test_rule_host():
    err = refusal(sign_policy(make_policy(), KEY), host=OTHER_HOST)
    assert err.rule == "host"
    assert str(err) == (
        f"refused by rule 'host': this host ({OTHER_HOST}) is not among the allowed hosts [{HOST}]"
    )


def test_rule_expiry():
    signed = sign_policy(make_policy(not_after=datetime(2026, 1, 1, tzinfo=UTC)), KEY)
    err = refusal(signed)
    assert err.rule == "expiry"
    assert str(err) == (
        "refused by rule 'expiry': the policy for model m expired at 2026-01-01T00:00:00+00:00"
    )
    # Valid up to and including the instant it names.
    assert check(signed, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert refusal(signed, now=datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)).rule == "expiry"


def test_expiry_uses_the_clock_by_default():
    past = datetime.now(UTC) - timedelta(minutes=1)
    future = datetime.now(UTC) + timedelta(days=1)
    assert refusal(sign_policy(make_policy(not_after=past), KEY), now=None).rule == "expiry"
    assert check(sign_policy(make_policy(not_after=future), KEY), now=None)


def test_rule_model():
    err = refusal(sign_policy(make_policy(model_id="x"), KEY), model_id="y")
    assert err.rule == "model"
    assert str(err) == "refused by rule 'model': the policy is for model x, not y"


def test_rule_signature_untrusted_signer():
    other = Ed25519PrivateKey.generate()
    err = refusal(sign_policy(make_policy(), other))
    assert err.rule == "signature"
    assert str(err) == "refused by rule 'signature': the policy is not signed by a trusted key"
    assert "no trusted signing keys" in str(
        refusal(sign_policy(make_policy(), KEY), trusted_signers=[])
    )


def test_trusted_signers_may_be_written_in_uppercase():
    assert check(sign_policy(make_policy(), KEY), trusted_signers=[f" {SIGNER.upper()} "])


def test_rule_signature_forged_signer_field():
    # Signed by an untrusted key but claiming a trusted signer: the signature does not verify.
    signed = sign_policy(make_policy(), Ed25519PrivateKey.generate())
    err = refusal({**signed, "signer": SIGNER})
    assert err.rule == "signature"


def test_altered_policy_is_refused():
    signed = sign_policy(make_policy(), KEY)
    altered = {**signed, "policy": {**signed["policy"], "users": ["alice", "mallory"]}}
    assert refusal(altered, user="mallory").rule == "signature"


@pytest.mark.parametrize(
    "signed",
    [None, "text", [], {}, {"policy": {}, "signature": "00", "signer": SIGNER}],
)
def test_malformed_signed_policy_is_refused(signed):
    assert refusal(signed).rule == "signature"


def test_signed_but_invalid_policy_is_refused():
    body = {**make_policy().model_dump(mode="json"), "surprise": 1}
    signed = {
        "policy": body,
        "signature": KEY.sign(SIGNATURE_DOMAIN + canonical_json(body)).hex(),
        "signer": SIGNER,
    }
    err = refusal(signed)
    assert err.rule == "signature" and "not a valid load policy (surprise:" in str(err)


def _variants(ch: str) -> set[str]:
    """Characters to put in place of `ch`: a neighbour, the other case, a digit, a letter."""
    return {chr(ord(ch) ^ 1), ch.swapcase(), "0", "a"} - {ch}


def test_any_single_character_change_is_refused():
    text = json.dumps(sign_policy(make_policy(), KEY), separators=(",", ":"))
    tried = 0
    for i, ch in enumerate(text):
        for repl in _variants(ch):
            try:
                changed = json.loads(text[:i] + repl + text[i + 1 :])
            except ValueError:
                continue  # no longer JSON: refused before it ever reaches check_policy
            tried += 1
            with pytest.raises(PolicyRefused) as err:
                check(changed)
            assert err.value.rule == "signature", (i, repl)
    assert tried > len(text)


def test_naive_datetimes_are_refused():
    with pytest.raises(ValidationError):
        make_policy(not_after=datetime(2026, 6, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        check(sign_policy(make_policy(), KEY), now=datetime(2026, 1, 1))


def test_other_timezones_are_normalised_to_utc():
    plus2 = timezone(timedelta(hours=2))
    policy = make_policy(not_after=datetime(2026, 6, 1, 2, 0, tzinfo=plus2))
    assert policy == make_policy()
    assert policy.model_dump(mode="json")["not_after"] == "2026-06-01T00:00:00Z"


def test_extra_fields_are_refused():
    with pytest.raises(ValidationError):
        LoadPolicy.model_validate({**make_policy().model_dump(), "admin": True})


def test_signing_key_file(tmp_path):
    path = tmp_path / "signing.key"
    public = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == 32
    assert public_key_hex(path) == public and len(public) == 64
    key = load_signing_key(path)
    assert check(sign_policy(make_policy(), key), trusted_signers=[public])
    with pytest.raises(SecretFileError, match="refusing to overwrite"):
        generate_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match=r"signing key file .* readable or writable by group"):
        public_key_hex(path)
