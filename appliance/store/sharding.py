"""Which part of each stored tensor a tensor-parallel rank needs, so that the rank reads and
decrypts only that part of the store instead of the whole model.

The rules are vLLM's weight loaders for Llama and Qwen2 (vllm/model_executor/layers/linear.py
and vocab_parallel_embedding.py, the same in 0.24 and 0.32), for a group of W ranks, rank r:
- q_proj, gate_proj, up_proj (ColumnParallelLinear, QKVParallelLinear, MergedColumnParallel-
  Linear), weight and bias: rows [r n/W, (r+1) n/W) of dim 0.
- k_proj, v_proj: the same while W <= the number K of kv heads; with W > K each head is
  replicated on W/K ranks, and rank r takes head r // (W/K).
- o_proj, down_proj (RowParallelLinear): columns [r n/W, (r+1) n/W) of dim 1; a bias whole.
- model.embed_tokens, lm_head (VocabParallelEmbedding, ParallelLMHead): the vocabulary V padded
  to a multiple of 64 is split evenly, p = padded/W rows a rank; rank r takes rows
  [min(r p, V), min((r+1) p, V)).
- norms and any other tensor: whole.

Rows of dim 0 lie together in tensors.bin, so a rank reads only the chunks that cover its rows:
1/W of the tensor plus at most two chunks. Columns of dim 1 are strided: a rank reads the whole
tensor. o_proj and down_proj are 30% of Llama-3-8B's bytes, so a rank would read 65% of the
model at W=2 and 39% at W=8 (a layout written per rank at import would remove that part); the
chunks at the ends of each part, and those two windows share, bring it to 70% and 44% with the
default 4 MiB chunks (66% and 40% with 1 MiB chunks).

A rank authenticates every chunk it reads; a chunk it does not read is neither decrypted nor
checked, and nothing of it reaches vLLM: the loader hands each tensor out whole-shaped with
zeros outside the rank's part (loader.stream_to_gpu).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, NamedTuple

from appliance.store.format import StoreIndex, TensorEntry

if TYPE_CHECKING:
    import torch

# vLLM's VocabParallelEmbedding pads the vocabulary to a multiple of this
# (DEFAULT_VOCAB_PADDING_SIZE).
VOCAB_PADDING = 64

_LAYER = re.compile(
    r"model\.layers\.\d+\.(?:self_attn\.(?P<attn>[qkvo])_proj|mlp\.(?P<mlp>gate|up|down)_proj)"
    r"\.(?P<kind>weight|bias)"
)
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


class Shard(NamedTuple):
    """Indices start..stop-1 of dimension `dim` of a tensor."""

    dim: int
    start: int
    stop: int


class LlamaSharding:
    """The part of each of a Llama or Qwen2 model's tensors that rank `rank` of `world`
    tensor-parallel ranks loads in vLLM."""

    ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM"})

    def __init__(self, world: int, rank: int, num_kv_heads: int, vocab_size: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} ranks")
        self.world = world
        self.rank = rank
        self.num_kv_heads = num_kv_heads
        self.vocab_size = vocab_size

    @classmethod
    def from_config(
        cls, config: bytes | str | dict[str, Any], world: int, rank: int
    ) -> LlamaSharding | None:
        """The split for a model's config.json, or None where there is none (one rank) or it is
        not known here (another architecture, quantized weights): the rank then reads it all."""
        if world <= 1:
            return None
        if not isinstance(config, dict):
            config = json.loads(config)
        architectures = set(config.get("architectures") or ())
        if not architectures or not architectures <= cls.ARCHITECTURES:
            return None
        if config.get("quantization_config"):
            return None  # packed weights and scales follow other rules
        heads = config["num_attention_heads"]
        return cls(world, rank, config.get("num_key_value_heads") or heads, config["vocab_size"])

    def shard(self, name: str, shape: tuple[int, ...]) -> Shard | None:
        """The rank's part of tensor `name` of `shape`, or None when it needs all of it (also
        for a name or shape vLLM would not split this way: reading it whole is always safe)."""
        if self.world == 1 or not shape:
            return None
        if name in _VOCAB:
            part = self._vocab(shape) if len(shape) == 2 else None
        elif (m := _LAYER.fullmatch(name)) is None:
            part = None
        elif m["attn"] == "o" or m["mlp"] == "down":
            part = self._even(shape, 1) if m["kind"] == "weight" and len(shape) == 2 else None
        elif m["attn"] in ("k", "v") and self.world > self.num_kv_heads:
            part = self._kv_replicated(shape)
        else:
            part = self._even(shape, 0) if len(shape) <= 2 else None
        if part is None or (part.start == 0 and part.stop == shape[part.dim]):
            return None
        return part

    def _even(self, shape: tuple[int, ...], dim: int) -> Shard | None:
        if shape[dim] % self.world:
            return None  # vLLM refuses such a split
        size = shape[dim] // self.world
        return Shard(dim, self.rank * size, (self.rank + 1) * size)

    def _kv_replicated(self, shape: tuple[int, ...]) -> Shard | None:
        kv = self.num_kv_heads
        if self.world % kv or shape[0] % kv or len(shape) > 2:
            return None
        head = shape[0] // kv
        index = self.rank // (self.world // kv)
        return Shard(0, index * head, (index + 1) * head)

    def _vocab(self, shape: tuple[int, ...]) -> Shard | None:
        vocab = self.vocab_size
        if shape[0] != vocab:
            return None  # vLLM's loader asserts the vocabulary size
        padded = -(-vocab // VOCAB_PADDING) * VOCAB_PADDING
        if padded % self.world:
            return None
        per = padded // self.world
        return Shard(0, min(self.rank * per, vocab), min((self.rank + 1) * per, vocab))


def tensor_shards(index: StoreIndex, policy: LlamaSharding) -> dict[str, Shard]:
    """The rank's shard of each stored tensor it needs only part of (a tensor not listed is
    needed whole). A tensor stored once under several names (tied weights) is split only where
    every name is split alike."""
    aliases: dict[str, list[str]] = {}
    for alias, target in index.aliases.items():
        aliases.setdefault(target, []).append(alias)
    out = {}
    for e in index.tensors:
        part = policy.shard(e.name, e.shape)
        if part is not None and all(
            policy.shard(a, e.shape) == part for a in aliases.get(e.name, ())
        ):
            out[e.name] = part
    return out


def byte_range(entry: TensorEntry, shard: Shard | None) -> tuple[int, int]:
    """The bytes of tensors.bin, [start, stop), that hold a rank's shard of `entry`: its rows for
    a dim-0 shard, the whole tensor otherwise (the columns of a dim-1 shard are strided)."""
    if shard is None or shard.dim != 0:
        return entry.offset, entry.offset + entry.nbytes
    row = entry.nbytes // entry.shape[0]
    return entry.offset + shard.start * row, entry.offset + shard.stop * row


def zero_outside(tensor: torch.Tensor, shard: Shard) -> None:
    """Zero what of `tensor` (its last dimension contiguous) lies outside `shard`, in place."""
    import torch

    if tensor.numel() == 0:
        return
    # Zeroed as bytes, which works for every dtype (not every one has a fill kernel).
    raw = tensor.view(torch.uint8)
    scale = raw.shape[-1] // tensor.shape[-1] if shard.dim == tensor.dim() - 1 else 1
    size, start, stop = (x * scale for x in (tensor.shape[shard.dim], shard.start, shard.stop))
    if start > 0:
        raw.narrow(shard.dim, 0, start).zero_()
    if stop < size:
        raw.narrow(shard.dim, stop, size - stop).zero_()
