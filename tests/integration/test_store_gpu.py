"""The store's GPU paths on a real GPU (run on the device machine with `pytest -m gpu`): loads
decrypted on the GPU equal the source and the CPU path; tampering is refused there too."""

from __future__ import annotations

import datetime as dt
import mmap

import pytest
import torch
from safetensors.torch import save_file

from appliance.store.format import DATA_FILE
from appliance.store.importer import import_checkpoint
from appliance.store.loader import (
    PinnedRing,
    load_to_gpu,
    load_to_host,
    plan_windows,
    stream_to_gpu,
)
from appliance.store.model import AccessRequest, StoredModel, StoreIntegrityError
from security.keys import generate_key_file
from security.policy import LoadPolicy, generate_signing_key, load_signing_key, sign_policy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture
def stored(tmp_path):
    kek = generate_key_file(tmp_path / "kek.key")
    pub = generate_signing_key(tmp_path / "signing.key")
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(300_001, generator=g).to(torch.bfloat16),
        "b": torch.randn(77, 1001, generator=g),
        "c": torch.arange(12345, dtype=torch.int64),
        **{f"layer{i}": torch.randn(3000 + 17 * i, generator=g) for i in range(40)},
    }
    tensors["tied"] = tensors["b"].clone()  # stored once, recorded as an alias
    save_file(tensors, str(src / "model.safetensors"))
    policy = sign_policy(
        LoadPolicy(model_id="m", issuer="t", issued_at=dt.datetime.now(dt.UTC)),
        load_signing_key(tmp_path / "signing.key"),
    )
    # 64 KiB chunks: many chunks, a short last one, several per staging unit.
    path = import_checkpoint(
        src, tmp_path / "store", "m", kek=kek, policy=policy, chunk_bytes=64 << 10, progress=False
    )
    return path, kek, AccessRequest(user="u", host="h", trusted_signers=[pub]), tensors


def test_gpu_decryption_equals_the_source_and_the_cpu_path(stored):
    path, kek, who, tensors = stored
    model = StoredModel.open(path, kek=kek, access=who)
    ring = PinnedRing(4, 256 << 10)
    flat_gpu, views = load_to_gpu(model, ring=ring, gpu_decrypt=True)
    flat_cpu, _ = load_to_gpu(model, ring=ring)
    assert torch.equal(flat_gpu, flat_cpu)
    for name, t in tensors.items():
        assert torch.equal(views[name].cpu(), t), name
    # A second load with the same (cached) kernels gives the same bytes.
    again, _ = load_to_gpu(model, ring=ring, gpu_decrypt=True)
    assert torch.equal(again, flat_cpu)


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_gpu_decryption_refuses_a_flipped_byte(stored, where):
    path, kek, who, _ = stored
    data = bytearray((path / DATA_FILE).read_bytes())
    pos = int(len(data) * where) if where >= 0 else len(data) - 1
    data[pos] ^= 1
    (path / DATA_FILE).write_bytes(bytes(data))
    model = StoredModel.open(path, kek=kek, access=who)
    chunk = pos // (64 << 10)
    with pytest.raises(StoreIntegrityError, match=rf"chunk {chunk} of m/tensors\.bin failed"):
        load_to_gpu(model, ring=PinnedRing(4, 256 << 10), gpu_decrypt=True)


WINDOW = 256 << 10


@pytest.mark.parametrize("gpu_decrypt", [True, False])
def test_streaming_load_equals_the_source_through_one_window(stored, gpu_decrypt):
    path, kek, who, tensors = stored
    model = StoredModel.open(path, kek=kek, access=who)
    assert len(plan_windows(model, WINDOW)) > 3
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = {}
    # As vLLM's load_weights does: copy each tensor before asking for the next.
    for name, t in stream_to_gpu(
        model, ring=PinnedRing(4, 128 << 10), gpu_decrypt=gpu_decrypt, window_bytes=WINDOW
    ):
        got[name] = t.clone()
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(got[name].cpu(), t), name
    copies = sum(t.nbytes for t in got.values())
    staged = torch.cuda.max_memory_allocated() - before - copies
    # One window (the largest tensor, "a", is 600 KB) and the decryptor's tables, not the model.
    assert staged < model.data_bytes / 2, (staged, model.data_bytes)


def test_streaming_load_hands_out_nothing_of_a_window_that_fails(stored):
    path, kek, who, _ = stored
    data = bytearray((path / DATA_FILE).read_bytes())
    data[len(data) - 1] ^= 1  # the last chunk: the last window
    (path / DATA_FILE).write_bytes(bytes(data))
    model = StoredModel.open(path, kek=kek, access=who)
    last = plan_windows(model, WINDOW)[-1]
    seen = []
    with pytest.raises(StoreIntegrityError, match="failed authentication"):
        for name, _t in stream_to_gpu(model, ring=PinnedRing(4, 128 << 10), window_bytes=WINDOW):
            seen.append(name)
    assert seen and not {e.name for e in last.tensors} & set(seen)


def test_streaming_from_a_host_tier_mapping(stored):
    path, kek, who, tensors = stored
    model = StoredModel.open(path, kek=kek, access=who)
    flat, _ = load_to_host(model)
    mm = mmap.mmap(-1, model.data_bytes)
    mm[:] = flat.numpy().tobytes()
    got = {
        name: t.clone()
        for name, t in stream_to_gpu(
            model, ring=PinnedRing(4, 128 << 10), window_bytes=WINDOW, mapping=mm
        )
    }
    for name, t in tensors.items():
        assert torch.equal(got[name].cpu(), t), name
