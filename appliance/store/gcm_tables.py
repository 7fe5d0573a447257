"""What the GPU's AES-256-GCM kernels need from the host: the AES round tables, the expanded
key, GHASH's key H and products in GF(2^128), all computed here from the data key."""

from __future__ import annotations

from functools import cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Words of the kernels' table block: 60 round-key words, four 256-word round tables, the S-box.
TABLE_WORDS = 60 + 4 * 256 + 256
GCM_ONE = 1 << 127  # the multiplicative identity in GCM's bit order
_R = 0xE1 << 120


def _xtime(b: int) -> int:
    b <<= 1
    return (b ^ 0x11B) if b & 0x100 else b


def _gf8_mult(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a = _xtime(a)
        b >>= 1
    return out


@cache
def _sbox() -> tuple[int, ...]:
    inverse = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if _gf8_mult(a, b) == 1:
                inverse[a] = b
                break
    box = []
    for a in range(256):
        x = inverse[a]
        y = x
        for shift in range(1, 5):  # the affine map: x ^ rotl(x,1..4) ^ 0x63
            y ^= ((x << shift) | (x >> (8 - shift))) & 0xFF
        box.append(y ^ 0x63)
    return tuple(box)


@cache
def round_tables() -> np.ndarray:
    """T0..T3 and the S-box (as words), 1280 uint32: the layout the kernels expect after the key."""
    box = _sbox()
    t0 = [(_xtime(s) << 24) | (s << 16) | (s << 8) | (_xtime(s) ^ s) for s in box]

    def rotr(w: int, n: int) -> int:
        return ((w >> n) | (w << (32 - n))) & 0xFFFFFFFF

    tables = t0 + [rotr(w, 8) for w in t0] + [rotr(w, 16) for w in t0] + [rotr(w, 24) for w in t0]
    return np.array(tables + list(box), dtype=np.uint32)


def expand_key(key: bytes) -> list[int]:
    """AES-256's 60 round-key words (FIPS 197), big-endian."""
    if len(key) != 32:
        raise ValueError("AES-256 needs a 32-byte key")
    box = _sbox()

    def sub(w: int) -> int:
        return (
            (box[w >> 24] << 24) | (box[(w >> 16) & 255] << 16) | (box[(w >> 8) & 255] << 8)
        ) | box[w & 255]

    words = [int.from_bytes(key[4 * i : 4 * i + 4], "big") for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = words[i - 1]
        if i % 8 == 0:
            t = sub(((t << 8) | (t >> 24)) & 0xFFFFFFFF) ^ (rcon << 24)
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            t = sub(t)
        words.append(words[i - 8] ^ t)
    return words


def kernel_tables(key: bytes) -> np.ndarray:
    """The expanded key followed by the round tables: TABLE_WORDS uint32."""
    return np.concatenate([np.array(expand_key(key), dtype=np.uint32), round_tables()])


def ghash_key(key: bytes) -> int:
    """H = AES_K(0^128) as a 128-bit integer (byte 0 most significant)."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return int.from_bytes(enc.update(bytes(16)) + enc.finalize(), "big")


def gf_mult(x: int, y: int) -> int:
    """x * y in GF(2^128), GCM's bit order (NIST SP 800-38D, algorithm 1)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _R if v & 1 else v >> 1
    return z


def gf_pow(h: int, e: int) -> int:
    result = GCM_ONE
    while e:
        if e & 1:
            result = gf_mult(result, h)
        h = gf_mult(h, h)
        e >>= 1
    return result


def split(x: int) -> tuple[int, int]:
    """(hi, lo) 64-bit halves of a 128-bit block, as the kernels take them."""
    return x >> 64, x & ((1 << 64) - 1)
