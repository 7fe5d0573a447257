"""Key-encryption keys (from a 0600 key file or an Argon2id passphrase) and data-key wrapping."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from appliance.security.secret_files import read_secret_file, write_secret_file
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from appliance.errors import ApplianceError

KEY_BYTES = 32
SALT_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEY_ID_LABEL = b"appliance-kek-id"
_KDF_NAME = "argon2id"


class KeySetupError(ApplianceError):
    """A key-encryption key cannot be made: empty passphrase, bad key-derivation record."""


class KeyWrapError(ApplianceError):
    """A wrapped data key is malformed or cannot be unwrapped."""


class WrongKey(KeyWrapError):
    """The key given is not the key that wrapped this data key (or the wrap was tampered with)."""


@dataclass(frozen=True)
class KeyEncryptionKey:
    """A 32-byte key that wraps data keys; `key_id` names it without revealing it."""

    key: bytes = field(repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a key-encryption key is {KEY_BYTES} bytes, got {len(self.key)}")
        # An HMAC, not a plain hash: the id is a public label, and must not help guess the key.
        digest = hmac.new(self.key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()
        object.__setattr__(self, "key_id", digest[:16])

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> KeyEncryptionKey:
        """The key in a 32-byte file that only its owner can read (mode 0600 or stricter)."""
        return cls(read_secret_file(path, size=KEY_BYTES, what="key file"))

    @classmethod
    def from_passphrase(
        cls,
        passphrase: str,
        salt: bytes,
        *,
        memory_kib: int = 65536,
        iterations: int = 3,
        lanes: int = 4,
    ) -> KeyEncryptionKey:
        """The key derived from a passphrase with Argon2id (memory-hard, so guessing is costly)."""
        if not passphrase:
            raise KeySetupError("the passphrase is empty; a key cannot be derived from it")
        if len(salt) < 8:
            raise KeySetupError(f"the key-derivation salt is {len(salt)} bytes; at least 8 needed")
        try:
            kdf = Argon2id(
                salt=salt,
                length=KEY_BYTES,
                iterations=iterations,
                lanes=lanes,
                memory_cost=memory_kib,
            )
        except ValueError as exc:
            raise KeySetupError(f"invalid Argon2id parameters: {exc}") from None
        return cls(kdf.derive(passphrase.encode("utf-8")))

    @classmethod
    def from_kdf_params(cls, passphrase: str, params: KdfParams) -> KeyEncryptionKey:
        """The key derived from a passphrase with recorded parameters (see KdfParams)."""
        return cls.from_passphrase(
            passphrase,
            params.salt,
            memory_kib=params.memory_kib,
            iterations=params.iterations,
            lanes=params.lanes,
        )


@dataclass(frozen=True)
class KdfParams:
    """How a passphrase key was derived, so a store can derive the same key again."""

    salt: bytes
    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4

    @classmethod
    def new(cls) -> KdfParams:
        """Default Argon2id parameters with a fresh random salt."""
        return cls(salt=new_salt())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (the salt as hex)."""
        return {
            "kdf": _KDF_NAME,
            "salt": self.salt.hex(),
            "memory_kib": self.memory_kib,
            "iterations": self.iterations,
            "lanes": self.lanes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KdfParams:
        """Parameters from a record written by to_dict; KeySetupError when it is invalid."""
        try:
            if data.get("kdf", _KDF_NAME) != _KDF_NAME:
                raise ValueError(f"unknown kdf {data['kdf']!r}")
            params = cls(
                salt=bytes.fromhex(data["salt"]),
                memory_kib=int(data["memory_kib"]),
                iterations=int(data["iterations"]),
                lanes=int(data["lanes"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise KeySetupError(f"the key-derivation record is invalid: {exc!s}") from None
        return params


def new_salt() -> bytes:
    """A random salt for passphrase key derivation."""
    return os.urandom(SALT_BYTES)


def new_data_key() -> bytes:
    """A random 32-byte data key (one per model: it encrypts that model's weights)."""
    return os.urandom(KEY_BYTES)


def generate_key_file(path: str | os.PathLike[str]) -> KeyEncryptionKey:
    """Write a new random key to `path` (mode 0600, never overwriting) and return it."""
    key = os.urandom(KEY_BYTES)
    write_secret_file(path, key)
    return KeyEncryptionKey(key)


def wrap_data_key(kek: KeyEncryptionKey, data_key: bytes, context: bytes) -> dict[str, str]:
    """Encrypt a data key under a KEK, bound to `context` (e.g. b"model:<id>"); JSON-able."""
    if len(data_key) != KEY_BYTES:
        raise ValueError(f"a data key is {KEY_BYTES} bytes, got {len(data_key)}")
    nonce = os.urandom(_NONCE_BYTES)
    # The context is associated data: a wrap copied onto another model does not unwrap there.
    wrapped = AESGCM(kek.key).encrypt(nonce, data_key, context)
    return {"kek_id": kek.key_id, "nonce": nonce.hex(), "wrapped": wrapped.hex()}


def unwrap_data_key(kek: KeyEncryptionKey, wrapped: dict[str, Any], context: bytes) -> bytes:
    """The data key inside `wrapped`; raises WrongKey for another key, tampering or context."""
    try:
        kek_id, nonce_hex, wrapped_hex = wrapped["kek_id"], wrapped["nonce"], wrapped["wrapped"]
    except (KeyError, TypeError):
        raise KeyWrapError("malformed key wrap: it needs kek_id, nonce and wrapped") from None
    if kek_id != kek.key_id:
        raise WrongKey(
            f"this data key is wrapped by key {kek_id}, not by the key given ({kek.key_id})"
        )
    try:
        nonce, sealed = bytes.fromhex(nonce_hex), bytes.fromhex(wrapped_hex)
    except (TypeError, ValueError):
        raise WrongKey("wrong key or tampered key wrap") from None
    if len(nonce) != _NONCE_BYTES or len(sealed) != KEY_BYTES + _TAG_BYTES:
        raise WrongKey("wrong key or tampered key wrap")
    try:
        return AESGCM(kek.key).decrypt(nonce, sealed, context)
    except InvalidTag:
        raise WrongKey("wrong key or tampered key wrap") from None


def rewrap_data_key(
    old_kek: KeyEncryptionKey,
    new_kek: KeyEncryptionKey,
    wrapped: dict[str, Any],
    context: bytes,
) -> dict[str, str]:
    """The same data key wrapped by `new_kek` (key rotation: the weights are not re-encrypted)."""
    return wrap_data_key(new_kek, unwrap_data_key(old_kek, wrapped, context), context)
