"""The GPU's AES-256-GCM kernels, compiled as C and run on the CPU against `cryptography`: the
same per-lane code the GPU runs, so the tables, key schedule, counters and GHASH are checked
here; tests/integration/test_store_gpu.py runs them on a GPU."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
from appliance.security.aesgcm import AesGcm

from appliance.store.format import DATA_FILE_NO, chunk_aad, chunk_nonce
from appliance.store.gcm_tables import gf_mult, gf_pow, ghash_key, kernel_tables, split
from appliance.store.gpu_decrypt import SOURCE

u64 = ctypes.c_uint64


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the kernels as C")
    out = tmp_path_factory.mktemp("gcm") / "gcm.so"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Werror",
            "-shared",
            "-fPIC",
            "-x",
            "c",
            str(SOURCE),
            "-o",
            str(out),
        ],
        check=True,
    )
    return ctypes.CDLL(str(out))


def run_chunk(lib, key, ct, tag, index, aad, lanes):
    """(plaintext, tag matched) as the kernels compute them for one chunk."""
    buf = (ctypes.c_uint8 * len(ct)).from_buffer_copy(ct)
    tables = kernel_tables(key)
    h_hi, h_lo = split(ghash_key(key))
    acc = (u64 * 2)()
    args = (u64(len(ct) // 16), u64(index), ctypes.c_uint32(DATA_FILE_NO))
    lib.cpu_decrypt_chunk(
        buf, *args, u64(lanes), ctypes.c_void_p(tables.ctypes.data), u64(h_hi), u64(h_lo), acc
    )
    stride = -(-len(aad) // 16) * 16
    padded = (ctypes.c_uint8 * stride).from_buffer_copy(aad.ljust(stride, b"\0"))
    want = (ctypes.c_uint8 * 16).from_buffer_copy(tag)
    bad = lib.cpu_check_chunk(
        acc,
        padded,
        u64(len(aad)),
        *args,
        ctypes.c_void_p(tables.ctypes.data),
        u64(h_hi),
        u64(h_lo),
        want,
    )
    return bytes(buf), bad == 0


@pytest.mark.parametrize(
    ("blocks", "lanes"), [(1, 256), (5, 8), (256, 32), (300, 256), (4096, 256), (4096, 4096)]
)
def test_kernels_decrypt_and_authenticate_like_openssl(lib, blocks, lanes):
    key, index = os.urandom(32), 123_456_789_012
    aad = chunk_aad("some/model-id", index, 200_000_000_000)
    plain = os.urandom(16 * blocks)
    ct, tag = AesGcm(key).encrypt(chunk_nonce(index), plain, aad)
    assert run_chunk(lib, key, ct, tag, index, aad, lanes) == (plain, True)


def test_kernels_refuse_altered_chunks(lib):
    key, index = os.urandom(32), 3
    aad = chunk_aad("m", index, 9)
    ct, tag = AesGcm(key).encrypt(chunk_nonce(index), os.urandom(16 * 300), aad)
    flipped = bytearray(ct)
    flipped[4000] ^= 0x20
    assert not run_chunk(lib, key, bytes(flipped), tag, index, aad, 64)[1]
    assert not run_chunk(lib, key, ct, tag, index + 1, chunk_aad("m", index + 1, 9), 64)[1]
    assert not run_chunk(lib, key, ct, tag, index, chunk_aad("m2", index, 9), 64)[1]
    assert not run_chunk(lib, os.urandom(32), ct, tag, index, aad, 64)[1]


def test_powers_in_python_and_c_agree(lib):
    h = ghash_key(os.urandom(32))
    out = (u64 * 2)()
    for e in (0, 1, 2, 31, 8192, 262_145):
        lib.cpu_pow(u64(split(h)[0]), u64(split(h)[1]), u64(e), out)
        assert (out[0], out[1]) == split(gf_pow(h, e))
    assert gf_mult(h, gf_pow(h, 10)) == gf_pow(h, 11)


def test_round_tables_are_fips_197():
    t = kernel_tables(bytes(32))
    assert t.dtype == np.uint32 and len(t) == 60 + 1280
    assert t[60] == 0xC66363A5  # T0[0]
    assert t[60 + 1024 + 0x53] == 0xED  # S-box
