"""AES-256-GCM on raw memory through OpenSSL's libcrypto (ctypes), so threads decrypt in parallel.

ctypes releases the GIL for the length of each foreign call, so N threads decrypting N chunks run
on N cores; the `cryptography` package's AESGCM holds the GIL and does not scale with threads. If
libcrypto cannot be loaded, the same API runs on `cryptography` (correct, but GIL bound).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

# EVP_CIPHER_CTX_ctrl commands (openssl/evp.h).
_EVP_CTRL_GCM_SET_IVLEN = 0x9
_EVP_CTRL_GCM_GET_TAG = 0x10
_EVP_CTRL_GCM_SET_TAG = 0x11

# EVP_*Update take an int length: feed big buffers in pieces well below 2**31 (a multiple of the
# AES block size, though GCM would accept any split).
_PIECE_BYTES = 1 << 30

_LIBCRYPTO_NAMES = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", "libcrypto.dylib")


class AuthenticationFailed(ApplianceError):
    """The GCM tag did not match: wrong key, wrong associated data, or tampered data."""


class CipherError(ApplianceError):
    """A libcrypto call failed for a reason other than a bad tag."""


def _load_libcrypto() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """libcrypto twice, with the prototypes this module uses: through PyDLL for the short calls
    (they keep the GIL) and through CDLL for the bulk update (it releases the GIL). Releasing and
    retaking the GIL around every short call made 16 loader threads queue for it; now each
    chunk releases it once, for the part that takes time. None when libcrypto cannot be loaded."""
    candidates = [ctypes.util.find_library("crypto"), *_LIBCRYPTO_NAMES]
    for name in candidates:
        if not name:
            continue
        try:
            short, bulk = ctypes.PyDLL(name), ctypes.CDLL(name)
            _declare(short)
            _declare(bulk)
        except (OSError, AttributeError):
            continue
        return short, bulk
    return None


def _declare(lib: ctypes.CDLL) -> None:
    """Exact argument and return types, so ctypes never truncates a pointer to a C int."""
    vp, i, ip = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
    lib.EVP_CIPHER_CTX_new.argtypes = []
    lib.EVP_CIPHER_CTX_new.restype = vp
    lib.EVP_CIPHER_CTX_free.argtypes = [vp]
    lib.EVP_CIPHER_CTX_free.restype = None
    lib.EVP_aes_256_gcm.argtypes = []
    lib.EVP_aes_256_gcm.restype = vp
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, i, i, vp]
    lib.EVP_CIPHER_CTX_ctrl.restype = i
    for init in (lib.EVP_EncryptInit_ex, lib.EVP_DecryptInit_ex):
        init.argtypes = [vp, vp, vp, vp, vp]  # ctx, cipher, engine, key, iv
        init.restype = i
    for update in (lib.EVP_EncryptUpdate, lib.EVP_DecryptUpdate):
        update.argtypes = [vp, vp, ip, vp, i]  # ctx, out, &outl, in, inl
        update.restype = i
    for final in (lib.EVP_EncryptFinal_ex, lib.EVP_DecryptFinal_ex):
        final.argtypes = [vp, vp, ip]
        final.restype = i
    lib.ERR_clear_error.argtypes = []
    lib.ERR_clear_error.restype = None


_libs = _load_libcrypto()
_lib, _bulk = _libs if _libs is not None else (None, None)

NATIVE: bool = _lib is not None
"""True when libcrypto is in use (parallel threads); False when `cryptography` stands in."""

_warned_fallback = False


def address_of(buffer: Any) -> int:
    """The address of a writable, contiguous buffer (bytearray, numpy array, memoryview of one).

    The address stays valid only while `buffer` is alive and not resized.
    """
    n = memoryview(buffer).nbytes
    return ctypes.addressof((ctypes.c_char * n).from_buffer(buffer))


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"AES-GCM nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")


def _check_span(src: int, n: int, dst: int) -> None:
    if n < 0:
        raise ValueError(f"length must not be negative, got {n}")
    if n and not (src and dst):
        raise ValueError("source and destination addresses must not be NULL")


class _Context:
    """One EVP_CIPHER_CTX with the key already scheduled; used by one thread only."""

    def __init__(self, lib: ctypes.CDLL, key: bytes, encrypt: bool):
        self._lib = lib
        self.encrypt = encrypt
        self.ptr = lib.EVP_CIPHER_CTX_new()
        if not self.ptr:
            raise CipherError("libcrypto could not allocate a cipher context")
        self.init = lib.EVP_EncryptInit_ex if encrypt else lib.EVP_DecryptInit_ex
        self.update = lib.EVP_EncryptUpdate if encrypt else lib.EVP_DecryptUpdate
        assert _bulk is not None
        self.bulk_update = _bulk.EVP_EncryptUpdate if encrypt else _bulk.EVP_DecryptUpdate
        self.final = lib.EVP_EncryptFinal_ex if encrypt else lib.EVP_DecryptFinal_ex
        # Key schedule once per thread; each call then only sets a new IV.
        self.check(self.init(self.ptr, lib.EVP_aes_256_gcm(), None, None, None), "init")
        self.check(
            lib.EVP_CIPHER_CTX_ctrl(self.ptr, _EVP_CTRL_GCM_SET_IVLEN, NONCE_BYTES, None), "ivlen"
        )
        self.check(self.init(self.ptr, None, None, key, None), "set key")

    def check(self, rc: int, step: str) -> None:
        """Raise CipherError unless a libcrypto call returned 1 (success)."""
        if rc != 1:
            self._lib.ERR_clear_error()
            raise CipherError(f"libcrypto AES-GCM {step} failed")

    def start(self, nonce: bytes, aad: bytes) -> None:
        self.check(self.init(self.ptr, None, None, None, nonce), "set nonce")
        outl = ctypes.c_int(0)
        view = memoryview(aad)
        for at in range(0, len(view), _PIECE_BYTES):
            piece = bytes(view[at : at + _PIECE_BYTES])
            # out=NULL: the bytes are authenticated, not encrypted.
            self.check(self.update(self.ptr, None, ctypes.byref(outl), piece, len(piece)), "aad")

    def run(self, src: int, n: int, dst: int) -> None:
        outl = ctypes.c_int(0)
        for at in range(0, n, _PIECE_BYTES):
            size = min(_PIECE_BYTES, n - at)
            self.check(
                self.bulk_update(self.ptr, dst + at, ctypes.byref(outl), src + at, size), "update"
            )
            if outl.value != size:
                raise CipherError("libcrypto AES-GCM wrote an unexpected number of bytes")

    def __del__(self) -> None:
        # Runs when the owning thread ends or the AesGcm is dropped; frees the key schedule too.
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self._lib.EVP_CIPHER_CTX_free(ptr)


class AesGcm:
    """AES-256-GCM with one key; safe to share between threads (each thread gets its own context).

    `native=None` uses libcrypto when it loaded; False forces `cryptography` (for comparisons),
    True insists on libcrypto.
    """

    def __init__(self, key: bytes, *, native: bool | None = None):
        global _warned_fallback
        if len(key) != KEY_BYTES:
            raise ValueError(f"AES-256-GCM key must be {KEY_BYTES} bytes, got {len(key)}")
        if native and not NATIVE:
            raise CipherError("OpenSSL libcrypto could not be loaded")
        self._key = bytes(key)
        self._native = NATIVE if native is None else native
        if not self._native and native is None and not _warned_fallback:
            _warned_fallback = True
            log.warning(
                "OpenSSL libcrypto could not be loaded; AES-GCM falls back to the cryptography "
                "package, which does not decrypt in parallel threads"
            )
        self._aead = AESGCM(self._key)
        self._local = threading.local()

    @property
    def native(self) -> bool:
        """Whether this instance runs on libcrypto."""
        return self._native

    def _context(self, encrypt: bool) -> _Context:
        # EVP contexts are not thread safe: one per thread and direction.
        name = "enc" if encrypt else "dec"
        ctx = getattr(self._local, name, None)
        if ctx is None:
            assert _lib is not None
            ctx = _Context(_lib, self._key, encrypt)
            setattr(self._local, name, ctx)
        return ctx

    def encrypt_into(self, nonce: bytes, src: int, n: int, dst: int, aad: bytes = b"") -> bytes:
        """Encrypt n bytes at address src into dst (may equal src); return the 16-byte tag."""
        _check_nonce(nonce)
        _check_span(src, n, dst)
        if not self._native:
            sealed = self._aead.encrypt(nonce, _view(src, n), aad)
            ctypes.memmove(dst, sealed, n)
            return sealed[n:]
        ctx = self._context(encrypt=True)
        ctx.start(nonce, aad)
        ctx.run(src, n, dst)
        scratch = ctypes.create_string_buffer(TAG_BYTES)
        outl = ctypes.c_int(0)
        ctx.check(ctx.final(ctx.ptr, scratch, ctypes.byref(outl)), "final")
        tag = ctypes.create_string_buffer(TAG_BYTES)
        ctx.check(_lib.EVP_CIPHER_CTX_ctrl(ctx.ptr, _EVP_CTRL_GCM_GET_TAG, TAG_BYTES, tag), "tag")
        return tag.raw

    def decrypt_into(
        self, nonce: bytes, src: int, n: int, dst: int, aad: bytes = b"", tag: bytes = b""
    ) -> None:
        """Decrypt n bytes at src into dst (may equal src), checking `tag`.

        Raises AuthenticationFailed on a bad tag; dst is then zeroed, never left half-trusted.
        """
        _check_nonce(nonce)
        _check_span(src, n, dst)
        if len(tag) != TAG_BYTES:
            raise ValueError(f"AES-GCM tag must be {TAG_BYTES} bytes, got {len(tag)}")
        if not self._native:
            try:
                # `cryptography` wants ciphertext || tag in one buffer.
                sealed = bytearray(n + TAG_BYTES)
                sealed[:n] = _view(src, n)
                sealed[n:] = tag
                plain = self._aead.decrypt(nonce, sealed, aad)
            except InvalidTag:
                raise AuthenticationFailed(_BAD_TAG) from None
            ctypes.memmove(dst, plain, n)
            return
        ctx = self._context(encrypt=False)
        ctx.start(nonce, aad)
        ctx.run(src, n, dst)
        ctx.check(_lib.EVP_CIPHER_CTX_ctrl(ctx.ptr, _EVP_CTRL_GCM_SET_TAG, TAG_BYTES, tag), "tag")
        scratch = ctypes.create_string_buffer(TAG_BYTES)
        outl = ctypes.c_int(0)
        if _lib.EVP_DecryptFinal_ex(ctx.ptr, scratch, ctypes.byref(outl)) <= 0:
            _lib.ERR_clear_error()
            # The plaintext was written before the tag could be checked: do not leave it there.
            ctypes.memset(dst, 0, n)
            raise AuthenticationFailed(_BAD_TAG)

    def encrypt(
        self, nonce: bytes, plaintext: bytes | memoryview, aad: bytes = b""
    ) -> tuple[bytes, bytes]:
        """(ciphertext, tag) of a bytes-like plaintext; copies, so big data uses encrypt_into."""
        buf = bytearray(plaintext)
        tag = self.encrypt_into(nonce, _addr(buf), len(buf), _addr(buf), aad)
        return bytes(buf), tag

    def decrypt(
        self, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes, tag: bytes
    ) -> bytes:
        """The plaintext of a bytes-like ciphertext; raises AuthenticationFailed on a bad tag."""
        buf = bytearray(ciphertext)
        self.decrypt_into(nonce, _addr(buf), len(buf), _addr(buf), aad, tag)
        return bytes(buf)


_BAD_TAG = "AES-GCM authentication failed: wrong key, wrong associated data, or tampered data"


def _addr(buf: bytearray) -> int:
    # An empty bytearray has no storage to point at; libcrypto is then never handed the address.
    return address_of(buf) if buf else 0


def _view(address: int, n: int) -> memoryview:
    """n bytes at an address, without copying (the fallback path hands it to `cryptography`)."""
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


def _benchmark() -> None:
    """Print decryption GB/s on 2 MiB chunks for 1 and 2 threads (or the counts given as args).

    Rows: this module on libcrypto, this module's fallback, and `cryptography`'s own
    AESGCM.decrypt (ciphertext || tag in, new bytes out) for reference.
    """
    import os
    import sys
    import time
    from collections.abc import Callable
    from concurrent.futures import ThreadPoolExecutor

    chunk, chunks = 2 << 20, 64
    threads = [int(a) for a in sys.argv[1:]] or [1, 2]
    key, aad = os.urandom(KEY_BYTES), b"bench"
    nonces = [i.to_bytes(NONCE_BYTES, "big") for i in range(chunks)]
    sealed = [bytearray(os.urandom(chunk)) for _ in range(chunks)]
    plain = [bytearray(chunk) for _ in range(chunks)]
    setup = AesGcm(key)
    tags = [
        setup.encrypt_into(nonces[i], _addr(b), chunk, _addr(b), aad) for i, b in enumerate(sealed)
    ]
    joined = [bytes(b) + t for b, t in zip(sealed, tags, strict=True)]

    def into(cipher: AesGcm) -> Callable[[int], None]:
        def one(i: int) -> None:
            src, dst = _addr(sealed[i]), _addr(plain[i])
            cipher.decrypt_into(nonces[i], src, chunk, dst, aad, tags[i])

        return one

    reference = AESGCM(key)
    rows: list[tuple[str, Callable[[int], None]]] = []
    if NATIVE:
        rows.append(("AesGcm, libcrypto", into(AesGcm(key, native=True))))
    rows.append(("AesGcm, fallback", into(AesGcm(key, native=False))))
    rows.append(("cryptography AESGCM", lambda i: reference.decrypt(nonces[i], joined[i], aad)))
    print(f"decrypting {chunks} x {chunk >> 20} MiB chunks (best of 3)")
    for name, one in rows:
        for count in threads:
            with ThreadPoolExecutor(count) as pool:
                list(pool.map(one, range(chunks)))  # warm-up: a context for every thread
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    list(pool.map(one, range(chunks)))
                    best = min(best, time.perf_counter() - start)
            print(f"{name:>20}: {count} thread(s): {chunks * chunk / best / 1e9:6.2f} GB/s")


if __name__ == "__main__":
    _benchmark()
