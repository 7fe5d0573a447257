"""The store's keys as configured: the key-encryption key (key file or passphrase), the policy
signing key and the signers loaders trust, and the identity a loader presents."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from appliance import envs
from appliance.config import ApplianceSettings
from appliance.security.keys import KeyEncryptionKey, KeySetupError, generate_key_file
from appliance.security.policy import (
    LoadPolicy,
    SignedPolicy,
    generate_signing_key,
    load_signing_key,
)
from appliance.security.policy import sign_policy as _sign
from appliance.security.signers import public_key_file, trusted_signers
from appliance.store.vllm_plugin import StoreLoadSpec, load_kek

KDF_FILE = "kdf.json"


def init_keys(settings: ApplianceSettings) -> list[str]:
    """Create whatever keys are missing (never replaces one); returns what was done."""
    done = []
    if not settings.kek_file.exists() and not envs.APPLIANCE_STORE_PASSPHRASE:
        settings.kek_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        kek = generate_key_file(settings.kek_file)
        done.append(f"key-encryption key {kek.key_id} written to {settings.kek_file}")
    if not settings.signing_key_file.exists():
        settings.signing_key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pub = generate_signing_key(settings.signing_key_file)
        public_key_file(settings).write_text(pub + "\n")
        done.append(f"policy signing key written to {settings.signing_key_file} (public: {pub})")
    return done


def store_kek(settings: ApplianceSettings, *, create_kdf: bool = False) -> KeyEncryptionKey:
    """The key-encryption key: the key file, else the passphrase in APPLIANCE_STORE_PASSPHRASE
    with the store's Argon2id parameters (made on first use when `create_kdf`)."""
    return load_kek(
        settings.kek_file, settings.store_root / KDF_FILE, passphrase=None, create_kdf=create_kdf
    )


def data_at_rest_kek(settings: ApplianceSettings) -> KeyEncryptionKey | None:
    """The key-encryption key when user data is encrypted at rest (it opens the knowledge
    bases' volumes), else None; KeySetupError, saying what to do, when it is missing."""
    if not settings.security.data_at_rest.enabled:
        return None
    try:
        return store_kek(settings)
    except KeySetupError as exc:
        raise KeySetupError(f"security.data_at_rest.enabled is on, but {exc}") from None


def load_spec(settings: ApplianceSettings, model_id: str) -> StoreLoadSpec:
    """What an instance of `model_id` needs to open it, from this stack's settings."""
    return StoreLoadSpec(
        model_dir=str(settings.store_root / model_id),
        model_id=model_id,
        key_file=str(settings.kek_file),
        kdf_file=str(settings.store_root / KDF_FILE),
        user=settings.store.load_user,
        roles=list(settings.store.load_roles),
        trusted_signers=trusted_signers(settings),
        threads=settings.store.loader_threads,
        gpu_decrypt=settings.store.gpu_decrypt,
        host_socket=str(host_socket_path(settings, "{node}")),
    )


def host_socket_path(settings: ApplianceSettings, node: str) -> Path:
    """Where a node's store service offers its host tier to local loaders."""
    return settings.layout.store_socket(node)


def sign_policy(
    settings: ApplianceSettings,
    model_id: str,
    *,
    users: list[str] | None = None,
    roles: list[str] | None = None,
    hosts: list[str] | None = None,
    not_after: dt.datetime | None = None,
) -> SignedPolicy:
    """A load policy signed with the store's signing key. With no users and no roles given, the
    policy admits the configured serving identity's roles."""
    users, roles = list(users or []), list(roles or [])
    if not users and not roles:
        roles = list(settings.store.load_roles)
    policy = LoadPolicy(
        model_id=model_id,
        users=users,
        roles=roles,
        hosts=list(hosts or []),
        not_after=not_after,
        issued_at=dt.datetime.now(dt.UTC),
        issuer=public_key_file(settings).read_text().strip()[:16]
        if public_key_file(settings).exists()
        else "admin",
    )
    return _sign(policy, load_signing_key(settings.signing_key_file))
