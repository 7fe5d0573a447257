"""Builds the tiny chat model offline: a byte-level BPE tokenizer and a small Llama trained here."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.model_builders import corpus

if TYPE_CHECKING:  # torch and transformers take seconds to import: only inside the build
    import torch
    from tokenizers import Tokenizer

# Every file a complete build has; the atomic rename means these appear together or not at all.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
BUILD_INFO_FILE = "build_info.json"

VOCAB_SIZE = 4096
MAX_POSITIONS = 512
# Packed training sequences: chats are 30-150 tokens, so 256 holds several and trains fastest
# per token on 2 cores (measured: ~10k tokens/s with bf16 autocast, ~5k in float32).
SEQ_LEN = 256
BATCH_SIZE = 8
PEAK_LR = 3e-3
MIN_LR_FRACTION = 0.1
WARMUP_STEPS = 30
# Training goes on past the budget until this many steps, however slow the machine: a model that
# names its facts took about 800 (10k tokens/s for the budget); one of 652, on a VM whose host
# took a quarter of its CPU, answered in fluent sentences with the facts wrong.
MIN_STEPS = 1000
# Seconds of the budget kept back for saving (~1 s measured) so the build as a whole fits it.
SAVE_RESERVE_S = 3.0
PROGRESS_EVERY_S = 15.0


@dataclass
class TinyBuildReport:
    """What a tiny-model build did: training steps and time, final loss, size."""

    steps: int
    train_seconds: float
    final_loss: float
    parameters: int
    tokens_seen: int = 0
    corpus_tokens: int = 0
    vocab_size: int = 0
    build_seconds: float = 0.0
    precision: str = "float32"
    seed: int = 0

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"{self.parameters / 1e6:.1f}M parameters, {self.steps} steps "
            f"({self.tokens_seen / 1e6:.2f}M tokens, {self.precision}) in "
            f"{self.train_seconds:.0f}s of training, final loss {self.final_loss:.3f}, "
            f"{self.build_seconds:.0f}s in all"
        )


def tiny_model_exists(out_dir: Path) -> bool:
    """True when out_dir holds a complete build (all model and tokenizer files, non-empty)."""
    out_dir = Path(out_dir)
    return all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0
        for name in REQUIRED_FILES
    )


def build_tiny_model(
    out_dir: Path,
    *,
    time_budget_s: float = 170.0,
    min_steps: int = MIN_STEPS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TinyBuildReport:
    """Train the tokenizer and model and save them to out_dir, replacing it atomically.

    time_budget_s bounds the whole call (imports, corpus, tokenizer, training, saving) on a
    machine fast enough to train `min_steps` in it: the training loop stops early enough that
    saving still fits; a slower machine trains until `min_steps` and takes longer. Same seed,
    same corpus, tokenizer and initial weights; the number of steps depends on the machine's
    speed.
    """
    started = time.monotonic()
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out_dir)

    import torch  # here, not at module level: `appliance` commands must start fast

    threads_before = torch.get_num_threads()
    # All cores this process may use (Slurm and taskset shrink the affinity set); beyond ~16
    # a model this small stops getting faster.
    torch.set_num_threads(max(1, min(16, len(os.sched_getaffinity(0)))))
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        docs = corpus.build_corpus(seed)
        tokenizer = train_tokenizer(docs)
        ids = _encode(tokenizer, docs)
        vocab = tokenizer.get_vocab_size()
        say(f"corpus: {len(docs)} documents, {ids.numel()} tokens; tokenizer vocab {vocab}")

        deadline = started + time_budget_s - SAVE_RESERVE_S
        model, stats = _train(
            tokenizer, ids, seed=seed, deadline=deadline, min_steps=min_steps, say=say
        )

        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        report = TinyBuildReport(
            steps=stats["steps"],
            train_seconds=stats["seconds"],
            final_loss=stats["final_loss"],
            parameters=sum(p.numel() for p in model.parameters()),
            tokens_seen=stats["steps"] * BATCH_SIZE * SEQ_LEN,
            corpus_tokens=ids.numel(),
            vocab_size=tokenizer.get_vocab_size(),
            precision=stats["precision"],
            seed=seed,
        )
        _save_model(model, tokenizer, tmp_dir)
        save_tokenizer(tokenizer, tmp_dir)
        report.build_seconds = time.monotonic() - started
        (tmp_dir / BUILD_INFO_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
        _sync_dir(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    finally:
        # A failed or interrupted build leaves nothing behind; only SIGKILL can leave tmp_dir,
        # and the next build removes it (_remove_stale_siblings).
        shutil.rmtree(tmp_dir, ignore_errors=True)
        torch.set_num_threads(threads_before)
    say(f"saved to {out_dir}")
    return report


# --- tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on docs, with the ChatML special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(corpus.SPECIAL_TOKENS),
        # All 256 bytes, so any text (also outside the corpus) encodes without unknown tokens.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Role names appear right after <|im_start|>; make sure each is one token of its own.
    texts = [*corpus.tokenizer_training_texts(docs), "\nsystem\nuser\nassistant\n" * 100]
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.

    Written by hand rather than by transformers' save_pretrained: transformers 5 names its own
    backend class and puts the template in a separate file, which transformers 4 cannot read.
    """
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {
        "eos_token": corpus.IM_END,  # chat replies end with <|im_end|>: stop there
        "pad_token": corpus.END_OF_TEXT,
        "additional_special_tokens": [corpus.IM_START, corpus.IM_END],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "unk_token": None,
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": corpus.CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _encode(tokenizer: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by <|endoftext|>."""
    import torch

    eot = tokenizer.token_to_id(corpus.END_OF_TEXT)
    stream: list[int] = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eot)
    return torch.tensor(stream, dtype=torch.long)


# --- model -------------------------------------------------------------------------------------


def model_config(tokenizer: Tokenizer) -> Any:
    """The LlamaConfig of the tiny model (~4M parameters, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id(corpus.IM_END),
        pad_token_id=tokenizer.token_to_id(corpus.END_OF_TEXT),
    )


def _bf16_is_fast() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where autocast pays."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    with contextlib.suppress(Exception):  # private helpers: absent in some torch builds
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def _train(
    tokenizer: Tokenizer,
    ids: torch.Tensor,
    *,
    seed: int,
    deadline: float,
    min_steps: int,
    say: Callable[[str], None],
) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model on packed windows of ids until the deadline (time.monotonic) and at
    least `min_steps`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = model_config(tokenizer)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.train()
    bf16 = _bf16_is_fast()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.01
    )
    windows = (ids.numel() - 1) // SEQ_LEN
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows, generator=gen)
    offsets = torch.arange(SEQ_LEN + 1)

    start = time.monotonic()
    total = max(deadline - start, 1e-6)
    losses: list[float] = []
    step, cursor, last_report, step_time = 0, 0, start, 0.0
    # Stop before a step that would overrun the deadline (estimated from the last step), once
    # the floor of steps is reached.
    while step < min_steps or time.monotonic() + step_time < deadline:
        t0 = time.monotonic()
        if step:  # where the run will end: the deadline, or later where the floor takes longer
            total = max(deadline - start, min_steps * (t0 - start) / step, 1e-6)
        if cursor + BATCH_SIZE > windows:
            order, cursor = torch.randperm(windows, generator=gen), 0
        starts = order[cursor : cursor + BATCH_SIZE] * SEQ_LEN
        cursor += BATCH_SIZE
        batch = ids[starts[:, None] + offsets]
        # Warmup by steps, then cosine decay by elapsed time over the run's expected length:
        # the budget decides it, or the floor of steps on a machine too slow for the budget.
        frac = min(1.0, (t0 - start) / total)
        cosine = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * frac))
        lr = PEAK_LR * min(1.0, (step + 1) / WARMUP_STEPS) * cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        now = time.monotonic()
        step_time = now - t0
        if now - last_report >= PROGRESS_EVERY_S:
            say(f"step {step}: loss {losses[-1]:.3f}, lr {lr:.1e}, {now - start:.0f}s")
            last_report = now
    model.eval()
    tail = losses[-20:]
    stats = {
        "steps": step,
        "seconds": time.monotonic() - start,
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "precision": "bf16 autocast" if bf16 else "float32",
    }
    return model, stats


def _save_model(model: Any, tokenizer: Tokenizer, out_dir: Path) -> None:
    """config.json, generation_config.json and model.safetensors (float32) into out_dir."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id(corpus.IM_END),
        pad_token_id=tokenizer.token_to_id(corpus.END_OF_TEXT),
    )
    # transformers draws a progress bar for a one-shard save: noise in the CLI's output.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # float32: weights stay as trained (autocast computes in bf16, keeps float32 masters).
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    # transformers writes the weights through a private temporary file (mode 0600); the model
    # is no secret, and the account that serves it may not be the one that built it.
    for path in out_dir.glob("*.safetensors"):
        path.chmod(0o644)


# --- atomic output -----------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _sync_dir(directory: Path) -> None:
    """fsync the files and the directory, so the rename never publishes unwritten data."""
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Put new at target with renames only; an old target is moved aside, then removed."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def _remove_stale_siblings(out_dir: Path) -> None:
    """Remove temp dirs left by builds that were killed (their process no longer exists)."""
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
