"""Key-encryption keys, key files, passphrase derivation and data-key wrapping."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from appliance.security.keys import (
    KdfParams,
    KeyEncryptionKey,
    KeySetupError,
    KeyWrapError,
    WrongKey,
    generate_key_file,
    new_data_key,
    new_salt,
    rewrap_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from appliance.security.secret_files import SecretFileError

from appliance.errors import ApplianceError

# Small Argon2id parameters keep the tests fast; production uses the defaults.
FAST = {"memory_kib": 1024, "iterations": 1, "lanes": 1}
CTX = b"model:m1"


@pytest.fixture
def kek() -> KeyEncryptionKey:
    return KeyEncryptionKey(os.urandom(32))


def test_key_id_is_stable_and_does_not_show_the_key():
    kek = KeyEncryptionKey(bytes(32))
    assert kek.key_id == KeyEncryptionKey(bytes(32)).key_id
    assert re.fullmatch("[0-9a-f]{16}", kek.key_id), kek.key_id
    assert kek.key_id != KeyEncryptionKey(b"\x01" * 32).key_id
    assert bytes(32).hex() not in repr(kek) and "key=" not in repr(kek)
    with pytest.raises(ValueError, match="32 bytes"):
        KeyEncryptionKey(b"short")


def test_wrap_round_trip_is_json_able(kek):
    data_key = new_data_key()
    wrapped = wrap_data_key(kek, data_key, CTX)
    assert set(wrapped) == {"kek_id", "nonce", "wrapped"} and wrapped["kek_id"] == kek.key_id
    assert data_key.hex() not in json.dumps(wrapped)
    assert unwrap_data_key(kek, json.loads(json.dumps(wrapped)), CTX) == data_key
    # A fresh nonce each time: the same key wraps to different bytes.
    assert wrap_data_key(kek, data_key, CTX)["wrapped"] != wrapped["wrapped"]


def test_wrong_key_is_named(kek):
    wrapped = wrap_data_key(kek, new_data_key(), CTX)
    other = KeyEncryptionKey(os.urandom(32))
    with pytest.raises(WrongKey) as err:
        unwrap_data_key(other, wrapped, CTX)
    assert str(err.value) == (
        f"this data key is wrapped by key {kek.key_id}, not by the key given ({other.key_id})"
    )
    assert isinstance(err.value, ApplianceError)


def test_wrong_key_with_forged_key_id_still_fails(kek):
    wrapped = wrap_data_key(kek, new_data_key(), CTX)
    other = KeyEncryptionKey(os.urandom(32))
    with pytest.raises(WrongKey, match="wrong key or tampered key wrap"):
        unwrap_data_key(other, {**wrapped, "kek_id": other.key_id}, CTX)


@pytest.mark.parametrize("field", ["nonce", "wrapped"])
def test_tampered_wrap_is_refused(kek, field):
    wrapped = wrap_data_key(kek, new_data_key(), CTX)
    raw = bytearray.fromhex(wrapped[field])
    raw[-1] ^= 0x01
    with pytest.raises(WrongKey, match="wrong key or tampered key wrap"):
        unwrap_data_key(kek, {**wrapped, field: raw.hex()}, CTX)


@pytest.mark.parametrize("bad", ["zz", "", "00" * 47])
def test_malformed_hex_is_refused(kek, bad):
    wrapped = wrap_data_key(kek, new_data_key(), CTX)
    with pytest.raises(WrongKey, match="tampered"):
        unwrap_data_key(kek, {**wrapped, "wrapped": bad}, CTX)


def test_missing_fields_are_refused(kek):
    with pytest.raises(KeyWrapError, match="malformed key wrap"):
        unwrap_data_key(kek, {"kek_id": kek.key_id}, CTX)


def test_context_mismatch_is_refused(kek):
    wrapped = wrap_data_key(kek, new_data_key(), CTX)
    with pytest.raises(WrongKey, match="wrong key or tampered key wrap"):
        unwrap_data_key(kek, wrapped, b"model:m2")


def test_rotation_rewraps_the_same_data_key(kek):
    data_key = new_data_key()
    old_wrap = wrap_data_key(kek, data_key, CTX)
    new_kek = KeyEncryptionKey(os.urandom(32))
    new_wrap = rewrap_data_key(kek, new_kek, old_wrap, CTX)
    assert new_wrap["kek_id"] == new_kek.key_id
    assert unwrap_data_key(new_kek, new_wrap, CTX) == data_key
    with pytest.raises(WrongKey, match="wrapped by key"):
        unwrap_data_key(kek, new_wrap, CTX)
    with pytest.raises(WrongKey):
        rewrap_data_key(new_kek, kek, old_wrap, CTX)


def test_data_key_must_be_32_bytes(kek):
    with pytest.raises(ValueError, match="32 bytes"):
        wrap_data_key(kek, b"short", CTX)


def test_generate_key_file_mode_and_no_overwrite(tmp_path):
    path = tmp_path / "kek"
    kek = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == kek.key and len(kek.key) == 32
    assert KeyEncryptionKey.from_key_file(path) == kek
    with pytest.raises(SecretFileError, match="already exists; refusing to overwrite"):
        generate_key_file(path)
    assert path.read_bytes() == kek.key


def test_generate_key_file_ignores_a_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        generate_key_file(tmp_path / "kek")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "kek").stat().st_mode) == 0o600


def test_generate_key_file_in_missing_directory(tmp_path):
    with pytest.raises(SecretFileError, match="directory does not exist"):
        generate_key_file(tmp_path / "nope" / "kek")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_loose_key_file_is_refused(tmp_path, mode):
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(SecretFileError) as err:
        KeyEncryptionKey.from_key_file(path)
    assert str(err.value) == (
        f"key file {path} is readable or writable by group or others (mode {mode:04o}); "
        f"run: chmod 600 {path}"
    )


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_file_is_accepted(tmp_path, mode):
    path = tmp_path / "kek"
    path.write_bytes(b"k" * 32)
    path.chmod(mode)
    assert KeyEncryptionKey.from_key_file(path).key == b"k" * 32


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_key_file_of_wrong_length_is_refused(tmp_path, size):
    path = tmp_path / "kek"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(SecretFileError, match=f"holds {size} bytes; it must hold exactly 32"):
        KeyEncryptionKey.from_key_file(path)


def test_missing_key_file_is_named(tmp_path):
    with pytest.raises(SecretFileError, match=f"key file {tmp_path / 'nope'} does not exist"):
        KeyEncryptionKey.from_key_file(tmp_path / "nope")


def test_directory_is_not_a_key_file(tmp_path):
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(SecretFileError, match="not a regular file"):
        KeyEncryptionKey.from_key_file(tmp_path / "d")


def test_passphrase_derivation_is_deterministic():
    salt = new_salt()
    assert len(salt) == 16 and salt != new_salt()
    a = KeyEncryptionKey.from_passphrase("correct horse", salt, **FAST)
    assert a == KeyEncryptionKey.from_passphrase("correct horse", salt, **FAST)
    assert a != KeyEncryptionKey.from_passphrase("correct horsf", salt, **FAST)
    assert a != KeyEncryptionKey.from_passphrase("correct horse", new_salt(), **FAST)
    assert a != KeyEncryptionKey.from_passphrase("correct horse", salt, **{**FAST, "iterations": 2})


def test_passphrase_key_wraps(kek):
    pkek = KeyEncryptionKey.from_passphrase("pw", new_salt(), **FAST)
    data_key = new_data_key()
    assert unwrap_data_key(pkek, wrap_data_key(pkek, data_key, CTX), CTX) == data_key


def test_empty_passphrase_is_refused():
    with pytest.raises(KeySetupError, match="passphrase is empty"):
        KeyEncryptionKey.from_passphrase("", new_salt(), **FAST)


def test_bad_argon2_parameters_are_clear():
    with pytest.raises(KeySetupError, match="invalid Argon2id parameters"):
        KeyEncryptionKey.from_passphrase("pw", new_salt(), memory_kib=1, iterations=1, lanes=4)


def test_kdf_params_round_trip_and_derive():
    params = KdfParams(salt=new_salt(), **FAST)
    record = json.loads(json.dumps(params.to_dict()))
    assert record["kdf"] == "argon2id" and record["salt"] == params.salt.hex()
    assert KdfParams.from_dict(record) == params
    assert KeyEncryptionKey.from_kdf_params("pw", params) == KeyEncryptionKey.from_passphrase(
        "pw", params.salt, **FAST
    )
    defaults = KdfParams.new()
    assert (defaults.memory_kib, defaults.iterations, defaults.lanes) == (65536, 3, 4)


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"kdf": "scrypt", "salt": "00" * 16, "memory_kib": 1024, "iterations": 1, "lanes": 1},
        {"salt": "not hex", "memory_kib": 1024, "iterations": 1, "lanes": 1},
        {"salt": "00" * 16, "memory_kib": "lots", "iterations": 1, "lanes": 1},
    ],
)
def test_invalid_kdf_record_is_refused(record):
    with pytest.raises(KeySetupError, match="key-derivation record is invalid"):
        KdfParams.from_dict(record)
