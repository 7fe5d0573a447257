"""The store's GPU paths on a real GPU (run on the device machine with `pytest -m gpu`): loads
decrypted on the GPU equal the source and the CPU path; tampering is refused there too; a
simulated tensor-parallel rank gets its parts of the weights and reads only those."""

from __future__ import annotations

import datetime as dt
import json
import mmap

import pytest
import torch
from appliance.security.keys import generate_key_file
from appliance.security.policy import (
    LoadPolicy,
    generate_signing_key,
    load_signing_key,
    sign_policy,
)
from safetensors.torch import save_file

from appliance.store import loader
from appliance.store.format import DATA_FILE
from appliance.store.importer import import_checkpoint
from appliance.store.loader import (
    PinnedRing,
    load_to_gpu,
    load_to_host,
    plan_windows,
    read_bytes,
    stream_to_gpu,
)
from appliance.store.model import AccessRequest, StoredModel, StoreIntegrityError
from appliance.store.sharding import LlamaSharding, byte_range, zero_outside

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def import_tensors(tmp_path, model_id: str, tensors: dict, files: dict | None = None):
    """The tensors (and small files) imported encrypted into a store under tmp_path, in 64 KiB
    chunks (many chunks, a short last one, several per staging unit); returns the model's
    folder, its key and an access request its signed policy admits."""
    kek = generate_key_file(tmp_path / "kek.key")
    pub = generate_signing_key(tmp_path / "signing.key")
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    for name, text in (files or {}).items():
        (src / name).write_text(text)
    policy = sign_policy(
        LoadPolicy(model_id=model_id, issuer="t", issued_at=dt.datetime.now(dt.UTC)),
        load_signing_key(tmp_path / "signing.key"),
    )
    path = import_checkpoint(
        src,
        tmp_path / "store",
        model_id,
        kek=kek,
        policy=policy,
        chunk_bytes=64 << 10,
        progress=False,
    )
    return path, kek, AccessRequest(user="u", host="h", trusted_signers=[pub])


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(300_001, generator=g).to(torch.bfloat16),
        "b": torch.randn(77, 1001, generator=g),
        "c": torch.arange(12345, dtype=torch.int64),
        **{f"layer{i}": torch.randn(3000 + 17 * i, generator=g) for i in range(40)},
    }
    tensors["tied"] = tensors["b"].clone()  # stored once, recorded as an alias
    return (*import_tensors(tmp_path, "m", tensors), tensors)


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


LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1536,
    "vocab_size": 1000,
    "num_hidden_layers": 2,
}


@pytest.fixture
def stored_llama(tmp_path):
    """A small Llama-shaped model (Hugging Face names, float32) in the store, 64 KiB chunks."""
    g = torch.Generator().manual_seed(1)
    h, inter, vocab = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    kv_rows = LLAMA["num_key_value_heads"] * h // LLAMA["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv_rows, h),
            p + "self_attn.v_proj.weight": (kv_rows, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    # No zeros in the weights: a zero in a rank's part would hide a part left unread.
    tensors = {n: torch.rand(s, generator=g) + 0.5 for n, s in shapes.items()}
    path, kek, who = import_tensors(tmp_path, "llama", tensors, {"config.json": json.dumps(LLAMA)})
    model = StoredModel.open(path, kek=kek, access=who)
    return model, tensors


def counting_reads(monkeypatch) -> list[int]:
    """Bytes the loader reads from tensors.bin, one entry a read."""
    counts: list[int] = []
    real = loader.read_exact

    def read_exact(fd, view, offset):
        counts.append(len(view))
        real(fd, view, offset)

    monkeypatch.setattr(loader, "read_exact", read_exact)
    return counts


@pytest.mark.parametrize("gpu_decrypt", [True, False])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_tensor_parallel_rank_gets_its_parts_and_reads_about_half(
    stored_llama, monkeypatch, rank, gpu_decrypt
):
    model, tensors = stored_llama
    shards = LlamaSharding.from_config(model.index.files["config.json"], 2, rank)
    counts = counting_reads(monkeypatch)
    got = {
        name: t.clone()
        for name, t in stream_to_gpu(
            model,
            ring=PinnedRing(4, 128 << 10),
            gpu_decrypt=gpu_decrypt,
            window_bytes=WINDOW,
            shards=shards,
        )
    }
    assert set(got) == set(tensors)
    split = 0
    for name, want in tensors.items():
        have = got[name].cpu()
        part = shards.shard(name, tuple(want.shape))
        if part is None:
            assert torch.equal(have, want), name
            continue
        split += 1
        size = part.stop - part.start
        inside = have.narrow(part.dim, part.start, size)
        assert torch.equal(inside, want.narrow(part.dim, part.start, size)), name
        rest = have.clone()
        rest.narrow(part.dim, part.start, size).zero_()
        assert not rest.any(), name  # zeros, not another rank's weights nor stale bytes
    assert split == 2 + 7 * LLAMA["num_hidden_layers"]
    windows = plan_windows(model, WINDOW, shards)
    planned = read_bytes(model, windows)
    assert sum(counts) == planned
    # Half of each row-split tensor, all of o_proj and down_proj (35% of this model's bytes),
    # plus at most two chunks a split tensor and one a window (shared with the next).
    needed = 0
    for w in windows:
        for e, p in zip(w.tensors, w.shards, strict=True):
            lo, hi = byte_range(e, p)
            needed += hi - lo
    chunk = model.header.chunk_bytes
    assert needed <= planned <= needed + chunk * (2 * split + len(windows))
    assert 0.5 < planned / model.data_bytes < 0.72, planned / model.data_bytes


def test_a_tensor_parallel_rank_authenticates_what_it_reads(stored_llama):
    model, _ = stored_llama
    shards = LlamaSharding.from_config(model.index.files["config.json"], 2, 1)
    window = plan_windows(model, WINDOW, shards)[-1]
    last = window.reads[-1][1] - 1  # a chunk rank 1 reads: the end of lm_head's second half
    data = bytearray(model.data_path.read_bytes())
    data[last * model.header.chunk_bytes] ^= 1
    model.data_path.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match=rf"chunk {last} of llama/tensors\.bin"):
        for _ in stream_to_gpu(
            model, ring=PinnedRing(4, 128 << 10), window_bytes=WINDOW, shards=shards
        ):
            pass


def test_a_tensor_parallel_rank_from_a_host_tier_mapping(stored_llama):
    model, tensors = stored_llama
    flat, _ = load_to_host(model)
    mm = mmap.mmap(-1, model.data_bytes)
    mm[:] = flat.numpy().tobytes()
    shards = LlamaSharding.from_config(model.index.files["config.json"], 2, 0)
    for name, t in stream_to_gpu(
        model, ring=PinnedRing(4, 128 << 10), window_bytes=WINDOW, mapping=mm, shards=shards
    ):
        want = tensors[name].clone()
        part = shards.shard(name, tuple(want.shape))
        if part is not None:
            zero_outside(want, part)
        assert torch.equal(t.cpu(), want), name
