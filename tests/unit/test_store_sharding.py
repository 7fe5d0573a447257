"""Tensor-parallel loading from the store, with simulated ranks on the CPU: each rank's part of
every tensor follows vLLM's weight loaders, the ranks together cover each split tensor, and the
load plan reads only the chunks of a rank's parts (about 1/world of each row-split tensor)."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from appliance.store.format import ALIGN, StoreIndex, TensorEntry, align_up
from appliance.store.loader import plan_windows, read_bytes
from appliance.store.sharding import (
    LlamaSharding,
    Shard,
    byte_range,
    tensor_shards,
    zero_outside,
)

WORLDS = [1, 2, 4, 8]
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "num_hidden_layers": 32,
}
# Fewer kv heads than ranks (vLLM replicates them), biases on q/k/v, a vocabulary that is not a
# multiple of 64.
SMALL_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "num_hidden_layers": 2,
}
CONFIGS = {"llama-8b": LLAMA_8B, "small-qwen2": SMALL_QWEN2}


def shapes(config: dict, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """A model's tensors in Hugging Face's names, in checkpoint order."""
    h, n, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, inter, vocab = h // n, config["intermediate_size"], config["vocab_size"]
    bias = config["architectures"] == ["Qwen2ForCausalLM"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"] if layers is None else layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        for name, rows in (("q", n * hd), ("k", kv * hd), ("v", kv * hd)):
            out[p + f"self_attn.{name}_proj.weight"] = (rows, h)
            if bias:
                out[p + f"self_attn.{name}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, n * hd)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (vocab, h)
    return out


def policies(config: dict, world: int) -> list[LlamaSharding]:
    return [
        LlamaSharding(world, r, config["num_key_value_heads"], config["vocab_size"])
        for r in range(world)
    ]


def expected(config: dict, world: int, rank: int, name: str, shape) -> Shard | None:
    """vLLM's split, written out from its weight loaders (see sharding.py for where)."""
    if world == 1:
        return None
    kv, vocab = config["num_key_value_heads"], config["vocab_size"]
    proj = name.split(".")[-2]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        per = -(-vocab // 64) * 64 // world  # VocabParallelEmbedding: padded, split evenly
        return Shard(0, min(rank * per, vocab), min((rank + 1) * per, vocab))
    if proj in ("k_proj", "v_proj") and world > kv:  # QKVParallelLinear: replicated kv heads
        head = shape[0] // kv
        index = rank // (world // kv)
        return Shard(0, index * head, (index + 1) * head)
    if proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        size = shape[0] // world
        return Shard(0, rank * size, (rank + 1) * size)
    if proj in ("o_proj", "down_proj"):  # RowParallelLinear: columns
        size = shape[1] // world
        return Shard(1, rank * size, (rank + 1) * size)
    return None  # norms


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_each_ranks_part_follows_vllms_weight_loaders(config, world):
    for rank, policy in enumerate(policies(config, world)):
        for name, shape in shapes(config, layers=2).items():
            assert policy.shard(name, shape) == expected(config, world, rank, name, shape), (
                name,
                rank,
            )


def test_a_few_parts_by_number():
    big = policies(LLAMA_8B, 8)
    assert big[3].shard("model.layers.0.self_attn.k_proj.weight", (1024, 4096)) == (0, 384, 512)
    assert big[3].shard("model.layers.0.self_attn.q_proj.weight", (4096, 4096)) == (0, 1536, 2048)
    assert big[7].shard("lm_head.weight", (128256, 4096)) == (0, 112224, 128256)
    assert big[1].shard("model.layers.5.mlp.down_proj.weight", (4096, 14336)) == (1, 1792, 3584)
    small = policies(SMALL_QWEN2, 8)  # 2 kv heads of 8 rows, each on 4 ranks
    assert [p.shard("model.layers.1.self_attn.v_proj.bias", (16,)) for p in small] == [
        (0, 0, 8)
    ] * 4 + [(0, 8, 16)] * 4
    # 1000 rows padded to 1024: 128 a rank, the last rank's part ends at the vocabulary's end.
    assert small[7].shard("model.embed_tokens.weight", (1000, 64)) == (0, 896, 1000)
    assert small[0].shard("model.layers.0.self_attn.o_proj.bias", (64,)) is None
    assert small[0].shard("model.layers.0.mlp.experts.0.up_proj.weight", (128, 64)) is None
    # A shape vLLM would refuse to split is read whole.
    assert small[0].shard("model.embed_tokens.weight", (1001, 64)) is None
    assert policies(SMALL_QWEN2, 3)[0].shard("model.layers.0.mlp.up_proj.weight", (128, 64)) is None


@pytest.mark.parametrize("world", WORLDS[1:])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_ranks_together_cover_each_split_tensor_exactly(config, world):
    for name, shape in shapes(config, layers=1).items():
        parts = [p.shard(name, shape) for p in policies(config, world)]
        if all(part is None for part in parts):
            continue
        assert None not in parts, name
        dims = {part.dim for part in parts}
        assert len(dims) == 1, name
        ranges = sorted({(part.start, part.stop) for part in parts})
        # Distinct parts tile the dimension; ranks share a part only whole (replicated kv heads).
        assert ranges[0][0] == 0 and ranges[-1][1] == shape[dims.pop()], name
        for (_, stop), (start, _) in itertools.pairwise(ranges):
            assert stop == start, name
        copies = len(parts) // len(ranges)
        assert all(parts.count(part) == copies for part in parts), name


def test_the_policy_comes_from_config_json():
    raw = json.dumps(LLAMA_8B).encode()
    policy = LlamaSharding.from_config(raw, 4, 2)
    assert (policy.world, policy.rank, policy.num_kv_heads, policy.vocab_size) == (4, 2, 8, 128256)
    no_kv = {k: v for k, v in LLAMA_8B.items() if k != "num_key_value_heads"}
    assert LlamaSharding.from_config(no_kv, 4, 0).num_kv_heads == 32
    assert LlamaSharding.from_config(raw, 1, 0) is None
    for other in (
        {**LLAMA_8B, "architectures": ["MixtralForCausalLM"]},
        {**LLAMA_8B, "architectures": []},
        {**LLAMA_8B, "quantization_config": {"quant_method": "awq"}},
    ):
        assert LlamaSharding.from_config(other, 4, 0) is None
    with pytest.raises(ValueError):
        LlamaSharding(2, 2, 8, 128256)


# --- the load plan -----------------------------------------------------------------------------


def fake_model(tensors: dict[str, tuple[int, ...]], chunk: int, itemsize: int, aliases=None):
    """A stored model's index as the importer lays it out (each tensor 4 KiB aligned)."""
    entries, offset = [], 0
    for name, shape in tensors.items():
        offset = align_up(offset)
        nbytes = int(np.prod(shape)) * itemsize
        entries.append(TensorEntry(name, "F32" if itemsize == 4 else "BF16", shape, offset, nbytes))
        offset += nbytes
    data_bytes = align_up(max(offset, ALIGN))
    return SimpleNamespace(
        header=SimpleNamespace(chunk_bytes=chunk),
        index=StoreIndex(entries, aliases=dict(aliases or {})),
        data_bytes=data_bytes,
    )


def cover(lo: int, hi: int, chunk: int) -> set[int]:
    return set(range(lo // chunk, -(-hi // chunk))) if hi > lo else set()


@pytest.mark.parametrize("world", WORLDS)
def test_a_rank_reads_only_the_chunks_of_its_parts(world):
    chunk = 4 << 20
    model = fake_model(shapes(LLAMA_8B), chunk, itemsize=2)
    total = model.data_bytes
    assert read_bytes(model, plan_windows(model, 256 << 20)) >= total  # every chunk
    # What sharding.py says: ~65% of the model at world 2, ~39% at world 8, because o_proj and
    # down_proj (30% of the bytes) are read whole.
    by_dim = {0: 0, 1: 0}
    for e in model.index.tensors:
        part = policies(LLAMA_8B, world)[0].shard(e.name, e.shape)
        if part is not None:
            by_dim[part.dim] += e.nbytes
    if world > 1:
        assert by_dim[1] / total == pytest.approx(0.30, abs=0.01)
    fraction = (total - by_dim[0] * (1 - 1 / world)) / total
    assert fraction == pytest.approx({1: 1, 2: 0.65, 4: 0.48, 8: 0.39}[world], abs=0.01)
    for policy in policies(LLAMA_8B, world):
        parts = tensor_shards(model.index, policy)
        windows = plan_windows(model, 256 << 20, policy)
        for w in windows:
            read = {c for a, b in w.reads for c in range(a, b)}
            needed: set[int] = set()
            for e, part in zip(w.tensors, w.shards, strict=True):
                assert part == parts.get(e.name)
                lo, hi = byte_range(e, part)
                needed |= cover(lo, hi, chunk)
                if part is not None and part.dim == 0:
                    # 1/world of the tensor (the vocabulary: of its padded size), 2 chunks more.
                    assert hi - lo <= -(-e.shape[0] // 64) * 64 // world * e.nbytes // e.shape[0]
                    assert len(cover(lo, hi, chunk)) * chunk <= e.nbytes / world + 2 * chunk
            assert read == needed  # nothing else, and reads are whole ranges of the window
            assert all(w.first <= a < b <= w.end for a, b in w.reads)
            assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(w.reads))
        # Up to two chunks more for each split tensor, and a chunk two windows share is read by
        # both: 70% at world 2, 44% at world 8 with 4 MiB chunks.
        rank_bytes = read_bytes(model, windows)
        slack = 2 * chunk * (len(parts) + len(windows))
        assert fraction * total * 0.99 <= rank_bytes <= fraction * total + slack
        assert rank_bytes / total <= {1: 1.02, 2: 0.71, 4: 0.54, 8: 0.46}[world]


def simulate_load(model, data: np.ndarray, windows) -> dict[str, torch.Tensor]:
    """What stream_to_gpu hands out, on the CPU: a stale window buffer, only the planned chunks
    copied in, then everything outside each tensor's part zeroed."""
    chunk = model.header.chunk_bytes
    span = max((w.end - w.first) * chunk for w in windows)
    buf = torch.full((span,), 0xAB, dtype=torch.uint8)  # stale bytes of an earlier window
    out = {}
    for w in windows:
        base = w.first * chunk
        for a, b in w.reads:
            stop = min(b * chunk, model.data_bytes)
            buf[a * chunk - base : stop - base] = torch.from_numpy(data[a * chunk : stop])
        for e, part in zip(w.tensors, w.shards, strict=True):
            view = buf[e.offset - base : e.offset - base + e.nbytes].view(torch.float32)
            tensor = view.reshape(e.shape)
            if part is not None:
                zero_outside(tensor, part)
            out[e.name] = tensor.clone()
    return out


@pytest.mark.parametrize("chunk", [ALIGN, 3 * ALIGN])
@pytest.mark.parametrize("world", WORLDS)
def test_a_rank_gets_its_part_and_zeros_elsewhere(world, chunk):
    model = fake_model(shapes(SMALL_QWEN2), chunk, itemsize=4)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, model.data_bytes, dtype=np.uint8)  # no zero bytes
    source = {
        e.name: torch.from_numpy(data[e.offset : e.offset + e.nbytes].copy())
        .view(torch.float32)
        .reshape(e.shape)
        for e in model.index.tensors
    }
    for policy in policies(SMALL_QWEN2, world):
        windows = plan_windows(model, 5 * chunk, policy)
        got = simulate_load(model, data, windows)
        for name, want in source.items():
            part = policy.shard(name, want.shape)
            if part is None:
                assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
                continue
            size = part.stop - part.start
            inside = got[name].narrow(part.dim, part.start, size).contiguous()
            assert torch.equal(
                inside.view(torch.uint8),
                want.narrow(part.dim, part.start, size).contiguous().view(torch.uint8),
            ), name
            rest = got[name].clone()
            rest.narrow(part.dim, part.start, size).zero_()
            assert not rest.view(torch.uint8).any(), name


def test_the_unsharded_plan_reads_every_window_whole():
    model = fake_model(shapes(SMALL_QWEN2), ALIGN, itemsize=4)
    for w in plan_windows(model, 5 * ALIGN):
        assert w.reads == ((w.first, w.end),)
        assert w.shards == (None,) * len(w.tensors)


def test_tied_weights_are_split_only_where_every_name_is_split_alike():
    names = shapes(SMALL_QWEN2, layers=1)
    del names["lm_head.weight"]
    tied = fake_model(names, ALIGN, 4, aliases={"lm_head.weight": "model.embed_tokens.weight"})
    policy = policies(SMALL_QWEN2, 2)[1]
    assert tensor_shards(tied.index, policy)["model.embed_tokens.weight"] == (0, 512, 1000)
    odd = fake_model(names, ALIGN, 4, aliases={"extra.weight": "model.embed_tokens.weight"})
    assert "model.embed_tokens.weight" not in tensor_shards(odd.index, policy)


# --- vLLM's own weight loaders -----------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_layers():
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import linear, vocab_parallel_embedding

    with set_current_vllm_config(VllmConfig()):
        yield linear, vocab_parallel_embedding


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_what_vllms_weight_loaders_read_lies_inside_the_rank_part(
    vllm_layers, monkeypatch, config, world
):
    """Each of vLLM's layers loads the same parameter from the full tensor as from the tensor a
    rank is handed (its part, zeros elsewhere): the loader reads nothing outside the part."""
    import vllm.distributed.parallel_state as parallel_state

    linear, vocab = vllm_layers
    n, kv, vocab_size = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
    )
    hd, inter = config["hidden_size"] // n, config["intermediate_size"]
    small = 8  # the dimension vLLM does not split, kept small
    for rank, policy in enumerate(policies(config, world)):
        group = SimpleNamespace(rank_in_group=rank, world_size=world)
        monkeypatch.setattr(parallel_state, "_TP", group)
        kw = {"params_dtype": torch.float32}
        qkv = linear.QKVParallelLinear(small, hd, n, kv, bias=True, **kw)
        gate_up = linear.MergedColumnParallelLinear(small, [inter, inter], bias=False, **kw)
        o = linear.RowParallelLinear(n * hd, small, bias=True, **kw)
        down = linear.RowParallelLinear(inter, small, bias=False, **kw)
        embed = vocab.VocabParallelEmbedding(vocab_size, small, **kw)
        head = vocab.ParallelLMHead(vocab_size, small, **kw)
        cases = [
            ("self_attn.q_proj.weight", qkv.weight, (n * hd, small), "q"),
            ("self_attn.k_proj.weight", qkv.weight, (kv * hd, small), "k"),
            ("self_attn.v_proj.weight", qkv.weight, (kv * hd, small), "v"),
            ("self_attn.q_proj.bias", qkv.bias, (n * hd,), "q"),
            ("self_attn.k_proj.bias", qkv.bias, (kv * hd,), "k"),
            ("self_attn.v_proj.bias", qkv.bias, (kv * hd,), "v"),
            ("mlp.gate_proj.weight", gate_up.weight, (inter, small), 0),
            ("mlp.up_proj.weight", gate_up.weight, (inter, small), 1),
            ("self_attn.o_proj.weight", o.weight, (small, n * hd), None),
            ("self_attn.o_proj.bias", o.bias, (small,), None),
            ("mlp.down_proj.weight", down.weight, (small, inter), None),
        ]
        cases = [("model.layers.0." + name, *rest) for name, *rest in cases]
        cases += [
            ("model.embed_tokens.weight", embed.weight, (vocab_size, small), None),
            ("lm_head.weight", head.weight, (vocab_size, small), None),
        ]
        for name, param, shape, shard_id in cases:
            full = torch.arange(1, int(np.prod(shape)) + 1, dtype=torch.float32).reshape(shape)
            handed = full.clone()
            part = policy.shard(name, shape)
            if part is not None:
                zero_outside(handed, part)
            loaded = []
            for tensor in (full, handed):
                param.data.fill_(-1)
                args = (param, tensor) if shard_id is None else (param, tensor, shard_id)
                param.weight_loader(*args)
                loaded.append(param.data.clone())
            assert torch.equal(loaded[0], loaded[1]), (name, rank)
            assert (loaded[0] > 0).any(), (name, rank)  # it did load something


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint16, torch.bool]
)
@pytest.mark.parametrize("part", [Shard(0, 2, 5), Shard(1, 3, 7), Shard(0, 0, 4), Shard(1, 9, 9)])
def test_zero_outside_leaves_the_part_and_zeroes_the_rest(dtype, part):
    tensor = torch.randint(1, 100, (6, 9)).to(torch.float32).to(dtype)  # no zero element
    want = tensor.clone()
    zero_outside(tensor, part)
    size = part.stop - part.start
    got_raw, want_raw = tensor.view(torch.uint8), want.view(torch.uint8)
    scale = got_raw.shape[-1] // 9 if part.dim == 1 else 1
    inside = (part.dim, part.start * scale, size * scale)
    assert torch.equal(got_raw.narrow(*inside), want_raw.narrow(*inside))
    rest = got_raw.clone()
    rest.narrow(*inside).zero_()
    assert not rest.any()
    bias = torch.ones(10, dtype=dtype)
    zero_outside(bias, Shard(0, 4, 6))
    assert (
        bias.view(torch.uint8).reshape(10, -1).any(dim=1).tolist()
        == [False] * 4 + [True] * 2 + [False] * 4
    )
