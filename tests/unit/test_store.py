"""The model store: import, encryption at rest, policies, key rotation, loading, host tier."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from appliance.security.keys import KeyEncryptionKey, WrongKey, generate_key_file
from appliance.security.policy import (
    LoadPolicy,
    PolicyRefused,
    generate_signing_key,
    load_signing_key,
)
from appliance.security.policy import sign_policy as sign
from safetensors.torch import save_file

from appliance.store.format import DATA_FILE, HEADER_FILE, TAGS_FILE, StoreFormatError
from appliance.store.importer import import_checkpoint
from appliance.store.loader import load_to_host
from appliance.store.model import AccessRequest, StoredModel, StoreIntegrityError, rotate_key
from appliance.store.tiers import HostTier, TierFull

HOST = "hf-" + "ab" * 12
# A pattern that cannot occur by chance: the test looks for it in every file the loader touches.
MARKER = torch.tensor(list(b"PLAINTEXT-WEIGHT-MARKER-0123456789abcdef" * 4), dtype=torch.uint8)


def make_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Two shards, several dtypes, odd sizes, and a tied (byte-identical) pair across shards."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(37, 16, generator=g).to(torch.bfloat16)
    first = {
        "model.embed_tokens.weight": emb,
        "layers.0.w": torch.randn(13, 7, generator=g),
        "layers.0.h": torch.randn(5, 3, generator=g).half(),
        "marker": MARKER.clone(),
        "steps": torch.arange(11, dtype=torch.int64),
    }
    second = {
        "lm_head.weight": emb.clone(),
        "mask": torch.tensor([True, False, True]),
        "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
    }
    save_file(first, str(path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(path / "model-00002-of-00002.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    return {**first, **second}


@pytest.fixture
def keys(tmp_path):
    kek = generate_key_file(tmp_path / "kek.key")
    signer_pub = generate_signing_key(tmp_path / "signing.key")
    return kek, load_signing_key(tmp_path / "signing.key"), signer_pub


def policy_for(model_id, signer, **rules):
    rules.setdefault("issued_at", dt.datetime.now(dt.UTC))
    return sign(LoadPolicy(model_id=model_id, issuer="admin", **rules), signer)


def access(pub, user="alice", host=HOST, roles=(), now=None):
    return AccessRequest(user=user, host=host, trusted_signers=[pub], roles=list(roles), now=now)


@pytest.fixture
def stored(tmp_path, keys):
    kek, signer, _pub = keys
    src = tmp_path / "src"
    tensors = make_checkpoint(src)
    policy = policy_for("m1", signer, users=["alice"], hosts=[HOST])
    path = import_checkpoint(
        src, tmp_path / "store", "m1", kek=kek, policy=policy, chunk_bytes=4096, progress=False
    )
    return path, tensors


def assert_same(loaded: dict, tensors: dict) -> None:
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert loaded[name].reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("encrypted", [True, False])
def test_round_trip_is_bit_exact(tmp_path, keys, encrypted):
    kek, signer, pub = keys
    tensors = make_checkpoint(tmp_path / "src")
    policy = policy_for("m", signer) if encrypted else None
    path = import_checkpoint(
        tmp_path / "src",
        tmp_path / "store",
        "m",
        kek=kek if encrypted else None,
        policy=policy,
        chunk_bytes=8192,
        progress=False,
    )
    model = StoredModel.open(path, kek=kek, access=access(pub))
    _flat, loaded = load_to_host(model, threads=3)
    assert_same(loaded, tensors)
    # Tied weights are stored once and loaded as one storage.
    assert model.index.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()
    assert model.index.files["config.json"] == b'{"model_type": "llama"}'
    # Every tensor starts on a 4 KiB boundary; the file is padded to 4 KiB.
    assert all(e.offset % 4096 == 0 for e in model.index.tensors)
    assert (path / DATA_FILE).stat().st_size % 4096 == 0
    assert (path / TAGS_FILE).exists() == encrypted


def test_encrypted_store_holds_no_plaintext(stored):
    path, _ = stored
    marker = bytes(MARKER[:40].tolist())
    for f in path.iterdir():
        assert marker not in f.read_bytes(), f
    header = (path / HEADER_FILE).read_text()
    assert "layers.0.w" not in header and "llama" not in header  # index and files encrypted


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_any_chunk_is_refused(stored, keys, where):
    path, _ = stored
    kek, _, pub = keys
    data = bytearray((path / DATA_FILE).read_bytes())
    pos = {"first": 10, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[pos] ^= 1
    (path / DATA_FILE).write_bytes(bytes(data))
    model = StoredModel.open(path, kek=kek, access=access(pub))
    with pytest.raises(StoreIntegrityError, match=r"chunk \d+ of m1/tensors.bin failed"):
        load_to_host(model, threads=2)


def test_swapped_chunks_and_tags_are_refused(stored, keys):
    path, _ = stored
    kek, _, pub = keys
    data = bytearray((path / DATA_FILE).read_bytes())
    tags = bytearray((path / TAGS_FILE).read_bytes())
    data[0:4096], data[4096:8192] = data[4096:8192], data[0:4096]
    tags[0:16], tags[16:32] = tags[16:32], tags[0:16]
    (path / DATA_FILE).write_bytes(bytes(data))
    (path / TAGS_FILE).write_bytes(bytes(tags))
    with pytest.raises(StoreIntegrityError, match="chunk 0"):
        load_to_host(StoredModel.open(path, kek=kek, access=access(pub)), threads=1)


def test_truncated_data_or_tags_are_refused(stored, keys):
    path, _ = stored
    kek, _, pub = keys
    with (path / DATA_FILE).open("r+b") as f:
        f.truncate((path / DATA_FILE).stat().st_size - 4096)
    with pytest.raises(StoreIntegrityError, match="truncated"):
        StoredModel.open(path, kek=kek, access=access(pub))


def test_altered_index_or_header_is_refused(stored, keys):
    path, _ = stored
    kek, _, pub = keys
    original = (path / HEADER_FILE).read_text()
    header = json.loads(original)
    ct = bytearray(bytes.fromhex(header["index"]["ciphertext"]))
    ct[5] ^= 1
    header["index"]["ciphertext"] = ct.hex()
    (path / HEADER_FILE).write_text(json.dumps(header))
    with pytest.raises(StoreIntegrityError, match="index of model m1 failed authentication"):
        StoredModel.open(path, kek=kek, access=access(pub))
    # A layout field changed to match a doctored data file: the index no longer authenticates.
    header = json.loads(original)
    header["data_bytes"] -= 4096
    header["n_chunks"] -= 1
    (path / HEADER_FILE).write_text(json.dumps(header))
    with pytest.raises(StoreIntegrityError, match="index of model m1 failed authentication"):
        StoredModel.open(path, kek=kek, access=access(pub))


def test_a_flipped_byte_in_the_policy_is_refused(stored, keys):
    path, _ = stored
    kek, _, pub = keys
    header = json.loads((path / HEADER_FILE).read_text())
    header["policy"]["policy"]["users"] = ["alicf"]
    (path / HEADER_FILE).write_text(json.dumps(header))
    with pytest.raises(PolicyRefused) as err:
        StoredModel.open(path, kek=kek, access=access(pub, user="alicf"))
    assert err.value.rule == "signature"


def test_policy_refusals_name_their_rule(tmp_path, stored, keys):
    path, _ = stored
    kek, _, pub = keys
    with pytest.raises(PolicyRefused, match=r"rule 'user'.*bob"):
        StoredModel.open(path, kek=kek, access=access(pub, user="bob"))
    with pytest.raises(PolicyRefused, match="rule 'host'"):
        StoredModel.open(path, kek=kek, access=access(pub, host="hf-" + "cd" * 12))
    other_pub = generate_signing_key(tmp_path / "other.key")
    with pytest.raises(PolicyRefused, match="rule 'signature'"):
        StoredModel.open(path, kek=kek, access=access(other_pub))


def test_expired_policy_is_refused(tmp_path, keys):
    kek, signer, pub = keys
    make_checkpoint(tmp_path / "src")
    expires = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    path = import_checkpoint(
        tmp_path / "src",
        tmp_path / "store",
        "old",
        kek=kek,
        policy=policy_for("old", signer, not_after=expires),
        progress=False,
    )
    with pytest.raises(PolicyRefused, match=r"rule 'expiry'.*expired at 2026-01-01"):
        StoredModel.open(path, kek=kek, access=access(pub))
    later = access(pub, now=dt.datetime(2025, 12, 31, tzinfo=dt.UTC))
    StoredModel.open(path, kek=kek, access=later)


def test_wrong_key_and_wrong_passphrase_are_refused(tmp_path, keys):
    kek, signer, pub = keys
    make_checkpoint(tmp_path / "src")
    salt = b"s" * 16
    small = {"memory_kib": 1024, "iterations": 1, "lanes": 1}
    pass_kek = KeyEncryptionKey.from_passphrase("correct horse", salt, **small)
    path = import_checkpoint(
        tmp_path / "src",
        tmp_path / "store",
        "p",
        kek=pass_kek,
        policy=policy_for("p", signer),
        progress=False,
    )
    wrong = KeyEncryptionKey.from_passphrase("wrong horse", salt, **small)
    with pytest.raises(WrongKey, match="wrapped by key"):
        StoredModel.open(path, kek=wrong, access=access(pub))
    with pytest.raises(WrongKey):
        StoredModel.open(path, kek=kek, access=access(pub))
    StoredModel.open(path, kek=pass_kek, access=access(pub))


def test_key_rotation_keeps_models_loadable(tmp_path, stored, keys):
    path, tensors = stored
    kek, _, pub = keys
    weights_before = (path / DATA_FILE).read_bytes()
    new = generate_key_file(tmp_path / "kek2.key")
    rotate_key(path, kek, new)
    assert (path / DATA_FILE).read_bytes() == weights_before  # weights not re-encrypted
    with pytest.raises(WrongKey):
        StoredModel.open(path, kek=kek, access=access(pub))
    _, loaded = load_to_host(StoredModel.open(path, kek=new, access=access(pub)), threads=2)
    assert_same(loaded, tensors)


def test_swapping_whole_models_is_refused(tmp_path, stored, keys):
    path, _ = stored
    kek, _, pub = keys
    with pytest.raises(StoreIntegrityError, match="holds model 'm1', not 'm2'"):
        StoredModel.open(path, kek=kek, access=access(pub), expected_id="m2")


def test_bad_sources_get_clear_errors(tmp_path, keys):
    kek, _signer, _ = keys
    store = tmp_path / "store"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(StoreFormatError, match="pickled weights are not imported"):
        import_checkpoint(empty, store, "x", kek=None, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(StoreFormatError, match="not a safetensors file"):
        import_checkpoint(bad, store, "x", kek=None, progress=False)
    with pytest.raises(StoreFormatError, match="needs a signed load policy"):
        make_checkpoint(tmp_path / "ok")
        import_checkpoint(tmp_path / "ok", store, "x", kek=kek, progress=False)
    # Nothing half-imported is left behind.
    assert not store.exists() or list(store.iterdir()) == []


def test_no_plaintext_reaches_disk_during_a_load(tmp_path, stored, keys):
    """Load in a child process with TMPDIR pointed here, then scan every file under the paths
    a loader could write to: the store, the temp dir, the working dir, /dev/shm."""
    path, _ = stored
    _kek, _, pub = keys
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    script = f"""
import os, sys, torch
from appliance.store.loader import load_to_host
from appliance.store.model import AccessRequest, StoredModel
from appliance.security.keys import KeyEncryptionKey
from appliance.security.process import core_dumps_disabled, disable_core_dumps
disable_core_dumps()
assert core_dumps_disabled()
kek = KeyEncryptionKey.from_key_file({str(tmp_path / "kek.key")!r})
m = StoredModel.open({str(path)!r}, kek=kek, access=AccessRequest(
    user="alice", host={HOST!r}, trusted_signers=[{pub!r}]))
flat, t = load_to_host(m, threads=2)
assert bytes(t["marker"][:40].tolist()) == {bytes(MARKER[:40].tolist())!r}
print("loaded")
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp,
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    marker = bytes(MARKER[:40].tolist())
    roots = [tmp_path / "store", tmp, Path("/dev/shm")]
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file() and f.stat().st_size < 1 << 30:
                assert marker not in f.read_bytes(), f


def test_host_tier_evicts_least_recently_used(tmp_path):
    evicted = []
    tier = HostTier(budget_bytes=3000, on_evict=evicted.append)

    class Buffer:
        def __init__(self, n):
            self.data = bytearray(b"\x01" * n)

        def wipe(self):
            self.data[:] = bytes(len(self.data))

    def fill(n):
        return lambda: Buffer(n)

    a = tier.put("a", 1000, fill(1000))
    tier.release(a)
    b = tier.put("b", 1000, fill(1000))
    tier.release(b)
    tier.release(tier.get("a"))  # a is now the most recently used
    c = tier.put("c", 1500, fill(1500))  # must evict b, not a
    assert evicted == ["b"] and tier.holds() == ["a", "c"]
    assert tier.used_bytes == 2500
    # An entry in use is never evicted: c is taken, a is free.
    d = tier.put("d", 1500, fill(1500))
    assert evicted == ["b", "a"] and set(tier.holds()) == {"c", "d"}
    with pytest.raises(TierFull, match="in use"):
        tier.put("e", 1600, fill(1600))
    with pytest.raises(TierFull, match="larger than the host tier"):
        tier.put("huge", 4000, fill(4000))
    tier.release(c)
    tier.release(d)
    assert tier.evict("c") and tier.holds() == ["d"]
