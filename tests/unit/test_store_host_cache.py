"""The host-memory tier shared across processes: memfd buffers served over a Unix socket."""

from __future__ import annotations

import datetime as dt
import stat
import time

import pytest
import torch
from appliance.security.keys import generate_key_file
from appliance.security.policy import (
    LoadPolicy,
    generate_signing_key,
    load_signing_key,
    sign_policy,
)

from appliance.store.host_cache import (
    HostCacheServer,
    fill_from_store,
    open_from_host_tier,
)
from appliance.store.importer import import_checkpoint
from appliance.store.loader import load_from_mapping
from appliance.store.model import StoredModel
from appliance.store.tiers import HostTier
from tests.unit.test_store import assert_same, make_checkpoint


@pytest.fixture
def served(tmp_path):
    kek = generate_key_file(tmp_path / "kek.key")
    generate_signing_key(tmp_path / "sign.key")
    policy = sign_policy(
        LoadPolicy(model_id="m", issuer="t", issued_at=dt.datetime.now(dt.UTC)),
        load_signing_key(tmp_path / "sign.key"),
    )
    tensors = make_checkpoint(tmp_path / "src")
    path = import_checkpoint(
        tmp_path / "src", tmp_path / "store", "m", kek=kek, policy=policy, progress=False
    )
    model = StoredModel.open(path, kek=kek, access=None)
    tier = HostTier(budget_bytes=64 << 20)
    tier.release(tier.put("m", model.data_bytes, lambda: fill_from_store(model, threads=2)))
    server = HostCacheServer(tier, tmp_path / "run" / "store-n1.sock").start()
    yield model, tensors, tier, server
    server.close()


def test_loader_reads_the_model_from_the_services_memory(served):
    model, tensors, _, server = served
    mode = server.socket_path.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(server.socket_path.parent.stat().st_mode) == 0o700
    with open_from_host_tier(server.socket_path, "m") as cached:
        _, loaded = load_from_mapping(model, cached.map)
        assert_same(loaded, tensors)
        # Copy on write: a loader that writes changes its own page, never the tier's.
        loaded["layers.0.w"].add_(1)
    with open_from_host_tier(server.socket_path, "m") as again:
        _, fresh = load_from_mapping(model, again.map)
        assert fresh["layers.0.w"].equal(tensors["layers.0.w"])


def test_a_model_being_read_is_not_evicted(served):
    _, _, tier, server = served
    cached = open_from_host_tier(server.socket_path, "m")
    assert cached is not None
    assert not tier.evict("m")
    cached.close()
    deadline = time.monotonic() + 5
    while not tier.evict("m"):
        assert time.monotonic() < deadline, "the service did not release the model"
        time.sleep(0.05)
    assert open_from_host_tier(server.socket_path, "m") is None


def test_unknown_model_and_foreign_users_get_nothing(served, tmp_path):
    model, _, tier, server = served
    assert open_from_host_tier(server.socket_path, "other") is None
    assert open_from_host_tier(tmp_path / "absent.sock", "m") is None
    strict = HostCacheServer(tier, tmp_path / "run2" / "s.sock", allowed_uids={54321}).start()
    try:
        assert open_from_host_tier(strict.socket_path, "m") is None
    finally:
        strict.close()
    del model


def test_memfd_is_zeroed_on_eviction(served):
    _, _, tier, _ = served
    entry = tier.get("m")
    buf = entry.buffer
    tier.release(entry)
    view = torch.frombuffer(bytearray(buf.view()[:4096]), dtype=torch.uint8)
    assert view.any()
    addr = buf.addr
    assert tier.evict("m")
    assert addr and buf.map.closed
