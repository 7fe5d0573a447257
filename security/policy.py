"""Signed model-load policies: who may load which model, on which hosts, until when (Ed25519)."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

from appliance.security.secret_files import read_secret_file, write_secret_file
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError, field_validator

from appliance.errors import ApplianceError

_PRIVATE_KEY_BYTES = 32
# Signatures cover this prefix plus the canonical JSON, so a signing key's signature over some
# other JSON document (should the key ever sign one) can never pass as a load policy.
SIGNATURE_DOMAIN = b"appliance-load-policy-v1\n"
# Lowercase hex only: "AB" and "ab" decode alike, and a changed character must not verify.
_PUBLIC_KEY_HEX = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")
_UNTRUSTED = "the policy is not signed by a trusted key"

Rule = Literal["signature", "model", "user", "host", "expiry"]


class PolicyRefused(ApplianceError):
    """A load policy refused the load; `rule` names the rule that refused it."""

    def __init__(self, rule: Rule, message: str):
        self.rule = rule
        self.reason = message
        super().__init__(f"refused by rule '{rule}': {message}")


class LoadPolicy(BaseModel):
    """Who may load one model, on which hosts, until when. Empty lists mean "anyone"/"anywhere"."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    users: list[str] = []
    roles: list[str] = []
    # Host fingerprints (security.host); empty: any host.
    hosts: list[str] = []
    # None: the policy does not expire.
    not_after: AwareDatetime | None = None
    issued_at: AwareDatetime
    issuer: str

    @field_validator("not_after", "issued_at")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        # One spelling per instant, so the canonical JSON (and thus the signature) is unique.
        return value.astimezone(UTC) if value is not None else None


class SignedPolicy(TypedDict):
    """A policy as stored: its canonical JSON dict, the Ed25519 signature and the signer, as hex."""

    policy: dict[str, Any]
    signature: str
    signer: str


def canonical_json(policy: dict[str, Any]) -> bytes:
    """The exact bytes a policy's signature covers (after SIGNATURE_DOMAIN)."""
    return json.dumps(policy, sort_keys=True, separators=(",", ":")).encode("utf-8")


def generate_signing_key(path: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 private key (raw 32 bytes, mode 0600); return its public key hex."""
    key = Ed25519PrivateKey.generate()
    write_secret_file(path, key.private_bytes_raw())
    return key.public_key().public_bytes_raw().hex()


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The private key in a signing key file that only its owner can read."""
    raw = read_secret_file(path, size=_PRIVATE_KEY_BYTES, what="signing key file")
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_hex(private_key_path: str | os.PathLike[str]) -> str:
    """The public key (hex) of a signing key file: what hosts list as a trusted signer."""
    return load_signing_key(private_key_path).public_key().public_bytes_raw().hex()


def sign_policy(policy: LoadPolicy, private_key: Ed25519PrivateKey) -> SignedPolicy:
    """The policy signed by `private_key`."""
    body = policy.model_dump(mode="json")
    signature = private_key.sign(SIGNATURE_DOMAIN + canonical_json(body))
    return {
        "policy": body,
        "signature": signature.hex(),
        "signer": private_key.public_key().public_bytes_raw().hex(),
    }


def verify_signed_policy(signed: Any, *, trusted_signers: list[str]) -> LoadPolicy:
    """The policy inside `signed` if a trusted key signed it; PolicyRefused('signature') if not."""
    if not isinstance(signed, dict):
        raise PolicyRefused("signature", _UNTRUSTED)
    body, signature, signer = signed.get("policy"), signed.get("signature"), signed.get("signer")
    if not (
        isinstance(body, dict)
        and isinstance(signature, str)
        and isinstance(signer, str)
        and _SIGNATURE_HEX.fullmatch(signature)
        and _PUBLIC_KEY_HEX.fullmatch(signer)
    ):
        raise PolicyRefused("signature", _UNTRUSTED)
    trusted = {s.strip().lower() for s in trusted_signers}
    if signer not in trusted:
        hint = " (no trusted signing keys are configured)" if not trusted else ""
        raise PolicyRefused("signature", _UNTRUSTED + hint)
    try:
        message = SIGNATURE_DOMAIN + canonical_json(body)
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer)).verify(
            bytes.fromhex(signature), message
        )
    except (InvalidSignature, ValueError, TypeError):
        raise PolicyRefused("signature", _UNTRUSTED) from None
    try:
        return LoadPolicy.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "policy"
        raise PolicyRefused(
            "signature", f"the signed policy is not a valid load policy ({where}: {first['msg']})"
        ) from None


def check_policy(
    signed: Any,
    *,
    trusted_signers: list[str],
    model_id: str,
    user: str,
    roles: list[str],
    host: str,
    now: datetime | None = None,
) -> LoadPolicy:
    """The policy if it lets `user` (with `roles`) load `model_id` on `host` now.

    Raises PolicyRefused naming the first rule that refuses: signature, model, expiry, user, host.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    policy = verify_signed_policy(signed, trusted_signers=trusted_signers)
    if policy.model_id != model_id:
        raise PolicyRefused("model", f"the policy is for model {policy.model_id}, not {model_id}")
    if policy.not_after is not None and now > policy.not_after:
        raise PolicyRefused(
            "expiry", f"the policy for model {model_id} expired at {policy.not_after.isoformat()}"
        )
    if not _user_allowed(policy, user, roles):
        raise PolicyRefused("user", _user_refusal(policy, user))
    if policy.hosts and host not in policy.hosts:
        raise PolicyRefused(
            "host", f"this host ({host}) is not among the allowed hosts {_listed(policy.hosts)}"
        )
    return policy


def _user_allowed(policy: LoadPolicy, user: str, roles: list[str]) -> bool:
    # Neither users nor roles listed: the policy restricts hosts and time only.
    if not policy.users and not policy.roles:
        return True
    return user in policy.users or not set(roles).isdisjoint(policy.roles)


def _user_refusal(policy: LoadPolicy, user: str) -> str:
    if policy.users and policy.roles:
        return (
            f"user '{user}' is not among the allowed users {_listed(policy.users)} "
            f"and has none of the roles {_listed(policy.roles)}"
        )
    if policy.users:
        return f"user '{user}' is not among the allowed users {_listed(policy.users)}"
    return f"user '{user}' has none of the allowed roles {_listed(policy.roles)}"


def _listed(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"
