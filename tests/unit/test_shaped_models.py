"""The random-weight models of the presets' architectures: their sizes (counted, never built) and
the shard-by-shard writer on a small shape."""

from __future__ import annotations

import json
import math

import pytest

from appliance.model_builders import shaped
from appliance.models.catalog import PRESETS_FILE

# Parameters of the published checkpoints (their model cards and safetensors indexes).
PUBLISHED = {
    "llama-3.1-8b-instruct": 8_030_261_248,
    "llama-3.3-70b-instruct": 70_553_706_496,
    "qwen2.5-14b-instruct": 14_770_033_664,
}
SMALL_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_preset_shape_has_the_published_parameter_count_and_size(name):
    plan = shaped.tensor_plan(shaped.SHAPES[name])
    params = sum(math.prod(dims) for _, dims in plan)
    assert params == PUBLISHED[name]
    [preset] = [m for m in json.loads(PRESETS_FILE.read_text())["models"] if m["name"] == name]
    assert 2 * params / 1e9 == pytest.approx(preset["size_gb"], rel=0.01)  # bf16


def test_the_qwen2_shape_has_biases_on_q_k_v_only():
    names = [n for n, _ in shaped.tensor_plan(shaped.SHAPES["qwen2.5-14b-instruct"])]
    biases = {n.split(".")[-2] for n in names if n.endswith(".bias")}
    assert biases == {"q_proj", "k_proj", "v_proj"}


def test_shards_keep_transformers_order_and_size_limit():
    plan = shaped.tensor_plan(shaped.SHAPES["llama-3.3-70b-instruct"])
    shards = shaped.shard_plan(plan)
    assert [t for shard in shards for t in shard] == plan
    assert all(sum(2 * math.prod(d) for _, d in s) <= shaped.SHARD_BYTES for s in shards)
    assert len(shards) == 30  # as Meta's 70B checkpoint: 30 files of at most 5 GB


def test_the_writer_builds_shard_by_shard_and_resumes(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(shaped.SHAPES, "small-qwen2", SMALL_QWEN2)
    out = tmp_path / "m"
    shaped.build_shaped_model("small-qwen2", out, shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(f.name for f in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    assert model.dtype == torch.bfloat16
    params = dict(model.named_parameters())
    assert set(params) == set(index["weight_map"])
    assert params["model.layers.0.self_attn.q_proj.bias"].abs().sum() == 0
    assert params["model.norm.weight"].float().eq(1).all()
    assert 0.01 < params["model.layers.1.mlp.up_proj.weight"].float().std() < 0.03
    # A build stopped midway: the shards already written are kept, the missing one is drawn
    # again with the same values, and config.json (the mark of a whole model) comes last.
    kept = out / files[0]
    before = kept.stat().st_mtime_ns
    redrawn = (out / files[1]).read_bytes()
    (out / files[1]).unlink()
    (out / "config.json").unlink()
    shaped.build_shaped_model("small-qwen2", out, shard_bytes=200_000)
    assert kept.stat().st_mtime_ns == before
    assert (out / files[1]).read_bytes() == redrawn
    assert (out / "config.json").exists() and not list(out.glob("*.partial"))
