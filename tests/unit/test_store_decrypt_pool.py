"""Decrypt worker processes: plaintext identical to the in-process loader, tampering and dead
workers reported clearly, staging wiped, workers hardened and stopped."""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from appliance.store.decrypt_pool import DecryptPool, DecryptPoolError
from appliance.store.format import DATA_FILE
from appliance.store.importer import import_checkpoint
from appliance.store.loader import load_to_host, load_with_pool
from appliance.store.model import AccessRequest, StoredModel, StoreIntegrityError
from security.aesgcm import address_of
from security.keys import generate_key_file
from security.policy import LoadPolicy, generate_signing_key, load_signing_key, sign_policy


class _Done:
    def query(self) -> bool:
        return True


@pytest.fixture
def model_path(tmp_path):
    kek = generate_key_file(tmp_path / "kek.key")
    pub = generate_signing_key(tmp_path / "signing.key")
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file(
        {"w": torch.randn(50_000, generator=g), "b": torch.randn(7, generator=g)},
        str(src / "model.safetensors"),
    )
    policy = sign_policy(
        LoadPolicy(model_id="m", issuer="t", issued_at=dt.datetime.now(dt.UTC)),
        load_signing_key(tmp_path / "signing.key"),
    )
    path = import_checkpoint(
        src, tmp_path / "store", "m", kek=kek, policy=policy, chunk_bytes=4096, progress=False
    )
    return path, kek, AccessRequest(user="u", host="h", trusted_signers=[pub])


def _load(model: StoredModel, pool: DecryptPool) -> bytearray:
    dest = bytearray(model.data_bytes)

    def copy(slot: int, offset: int, n: int) -> _Done:
        ctypes.memmove(address_of(dest) + offset, pool.base + pool.slot_offset(slot), n)
        return _Done()

    load_with_pool(model, pool, copy)
    return dest


@pytest.fixture
def pool():
    p = DecryptPool(workers=2, unit_bytes=3 * 4096)
    yield p
    p.close()


def test_pool_plaintext_equals_the_in_process_loader(model_path, pool):
    path, kek, who = model_path
    model = StoredModel.open(path, kek=kek, access=who)
    expected, _ = load_to_host(model, threads=1)
    assert model.data_bytes % pool.unit_bytes  # the last unit is a short one
    assert _load(model, pool) == bytes(expected.numpy())
    assert _load(model, pool) == bytes(expected.numpy())  # the pool is kept for the next load
    pool.wipe()
    assert bytes(pool.view(0, pool.unit_bytes)) == bytes(pool.unit_bytes)


def test_a_tampered_chunk_is_refused_and_the_pool_stays_usable(model_path, pool):
    path, kek, who = model_path
    data = bytearray((path / DATA_FILE).read_bytes())
    data[5 * 4096 + 7] ^= 1
    (path / DATA_FILE).write_bytes(bytes(data))
    model = StoredModel.open(path, kek=kek, access=who)
    with pytest.raises(StoreIntegrityError, match=r"chunk 5 of m/tensors\.bin failed"):
        _load(model, pool)
    assert not pool.busy()
    data[5 * 4096 + 7] ^= 1
    (path / DATA_FILE).write_bytes(bytes(data))
    expected, _ = load_to_host(model, threads=1)
    assert _load(model, pool) == bytes(expected.numpy())


def test_a_dead_worker_is_a_clear_error(model_path, pool):
    path, kek, who = model_path
    model = StoredModel.open(path, kek=kek, access=who)
    os.kill(pool._procs[1].pid, signal.SIGKILL)
    pool._procs[1].wait(timeout=10)
    with pytest.raises(DecryptPoolError, match="decrypt worker 1"):
        _load(model, pool)


def test_workers_cannot_dump_core_and_stop_with_the_pool(model_path):
    pool = DecryptPool(workers=1, unit_bytes=4096)
    pid = pool._procs[0].pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    pool.close()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool._procs[0].poll() is not None
