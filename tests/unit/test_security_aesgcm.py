"""AES-256-GCM on raw memory: round trips, agreement with `cryptography`, tampering, threads."""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from appliance.security.aesgcm import AesGcm, AuthenticationFailed, address_of
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import ApplianceError

KEY = bytes(range(32))
NONCE = b"\x01" * 12
AAD = b"model:m1/shard-0"


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 1_000_003])
def test_round_trip(size):
    cipher = AesGcm(KEY)
    plain = os.urandom(size)
    ct, tag = cipher.encrypt(NONCE, plain, AAD)
    assert len(ct) == size and len(tag) == 16
    assert size == 0 or ct != plain
    assert cipher.decrypt(NONCE, ct, AAD, tag) == plain


@pytest.mark.parametrize("aad", [b"", AAD])
def test_agrees_with_cryptography_both_ways(aad):
    cipher = AesGcm(KEY)
    reference = AESGCM(KEY)
    plain = os.urandom(100_000)
    ct, tag = cipher.encrypt(NONCE, plain, aad)
    # cryptography's AESGCM output is ciphertext || tag.
    assert reference.encrypt(NONCE, plain, aad) == ct + tag
    assert reference.decrypt(NONCE, ct + tag, aad) == plain
    sealed = reference.encrypt(NONCE, plain, aad)
    assert cipher.decrypt(NONCE, sealed[:-16], aad, sealed[-16:]) == plain


def test_in_place_on_numpy_and_bytearray():
    cipher = AesGcm(KEY)
    plain = os.urandom(65_536 + 5)
    arr = np.frombuffer(bytearray(plain), dtype=np.uint8).copy()
    tag = cipher.encrypt_into(NONCE, arr.ctypes.data, arr.nbytes, arr.ctypes.data, AAD)
    assert arr.tobytes() == AESGCM(KEY).encrypt(NONCE, plain, AAD)[:-16]
    buf = bytearray(arr.tobytes())
    cipher.decrypt_into(NONCE, address_of(buf), len(buf), address_of(buf), AAD, tag)
    assert bytes(buf) == plain


def test_separate_destination_leaves_source_alone():
    cipher = AesGcm(KEY)
    src = bytearray(os.urandom(5000))
    dst = bytearray(len(src))
    tag = cipher.encrypt_into(NONCE, address_of(src), len(src), address_of(dst), AAD)
    original = bytes(src)
    out = bytearray(len(src))
    cipher.decrypt_into(NONCE, address_of(dst), len(dst), address_of(out), AAD, tag)
    assert bytes(out) == original == bytes(src)


def test_address_of_memoryview_and_numpy():
    buf = bytearray(b"abcdef")
    assert ctypes.string_at(address_of(memoryview(buf)), 6) == b"abcdef"
    arr = np.arange(4, dtype=np.float32)
    assert address_of(arr) == arr.ctypes.data
    with pytest.raises(TypeError):
        address_of(b"read-only bytes")


def _sealed() -> tuple[AesGcm, bytes, bytes, bytes]:
    cipher = AesGcm(KEY)
    plain = os.urandom(4096)
    ct, tag = cipher.encrypt(NONCE, plain, AAD)
    return cipher, plain, ct, tag


def test_wrong_key_is_refused():
    _, _, ct, tag = _sealed()
    other = AesGcm(bytes(32))
    with pytest.raises(AuthenticationFailed, match="authentication failed"):
        other.decrypt(NONCE, ct, AAD, tag)


def test_wrong_aad_is_refused():
    cipher, _, ct, tag = _sealed()
    with pytest.raises(AuthenticationFailed):
        cipher.decrypt(NONCE, ct, b"model:m2/shard-0", tag)


def test_flipped_ciphertext_byte_is_refused_and_output_zeroed():
    cipher, plain, ct, tag = _sealed()
    bad = bytearray(ct)
    bad[1234] ^= 0x01
    with pytest.raises(AuthenticationFailed) as err:
        cipher.decrypt_into(NONCE, address_of(bad), len(bad), address_of(bad), AAD, tag)
    assert isinstance(err.value, ApplianceError)
    # Unauthenticated plaintext must not be left behind in the caller's buffer.
    assert bytes(bad) == bytes(len(bad))
    # The same (thread's) context still works after a failure.
    assert cipher.decrypt(NONCE, ct, AAD, tag) == plain


def test_flipped_tag_bit_is_refused():
    cipher, _, ct, tag = _sealed()
    bad = bytes([tag[0] ^ 0x80]) + tag[1:]
    with pytest.raises(AuthenticationFailed):
        cipher.decrypt(NONCE, ct, AAD, bad)


def test_wrong_nonce_is_refused():
    cipher, _, ct, tag = _sealed()
    with pytest.raises(AuthenticationFailed):
        cipher.decrypt(b"\x02" * 12, ct, AAD, tag)


def test_bad_arguments():
    with pytest.raises(ValueError, match="32 bytes"):
        AesGcm(b"short")
    cipher = AesGcm(KEY)
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        cipher.encrypt(b"\x00" * 16, b"x", AAD)
    with pytest.raises(ValueError, match="tag must be 16 bytes"):
        cipher.decrypt(NONCE, b"x", AAD, b"\x00" * 8)
    with pytest.raises(ValueError, match="negative"):
        cipher.encrypt_into(NONCE, 0, -1, 0, AAD)
    with pytest.raises(ValueError, match="must not be NULL"):
        cipher.decrypt_into(NONCE, 0, 16, 0, AAD, bytes(16))


def test_threads_decrypt_distinct_buffers():
    """8 buffers of 4 MiB, each with its own nonce and aad, decrypted in place by 4 threads."""
    cipher = AesGcm(KEY)
    size = 4 << 20
    plains = [os.urandom(size) for _ in range(8)]
    nonces = [i.to_bytes(12, "big") for i in range(8)]
    aads = [f"model:m1/shard-{i}".encode() for i in range(8)]
    bufs = [bytearray(p) for p in plains]
    tags = [
        cipher.encrypt_into(nonces[i], address_of(b), size, address_of(b), aads[i])
        for i, b in enumerate(bufs)
    ]

    def decrypt(i: int) -> None:
        b = bufs[i]
        cipher.decrypt_into(nonces[i], address_of(b), size, address_of(b), aads[i], tags[i])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(decrypt, range(8)))
    assert all(bytes(b) == p for b, p in zip(bufs, plains, strict=True))


def test_threads_with_one_bad_buffer():
    cipher = AesGcm(KEY)
    bufs = [bytearray(os.urandom(65_536)) for _ in range(4)]
    tags = [cipher.encrypt_into(NONCE, address_of(b), len(b), address_of(b), AAD) for b in bufs]
    bufs[2][0] ^= 0xFF

    def decrypt(i: int) -> bool:
        b = bufs[i]
        try:
            cipher.decrypt_into(NONCE, address_of(b), len(b), address_of(b), AAD, tags[i])
        except AuthenticationFailed:
            return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(decrypt, range(4))) == [True, True, False, True]
