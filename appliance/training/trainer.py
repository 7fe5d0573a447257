"""The fine-tuning loop that runs inside the Slurm job: LoRA (peft) on the base model, evaluation
of base and tuned model on the held-out examples, progress after every step, checkpoints at
intervals and on SIGTERM/SIGUSR1 (preemption, requeue, cancel), resume from the latest one."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from appliance.atomic_files import read_json_object, write_json
from appliance.config.training import Hyperparameters
from appliance.lines import jsonl_lines
from appliance.training.examples import IGNORE, encode
from appliance.training.jobs import TrainingJob

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2


class Stopped(Exception):
    """A signal asked the job to stop; a checkpoint was written first."""


@dataclass
class Encoded:
    """Token ids and labels of one example."""

    ids: list[int]
    labels: list[int]


def read_examples(path: Path, tokenizer: Any) -> list[Encoded]:
    return [Encoded(*encode(tokenizer, json.loads(line))) for line in jsonl_lines(path.read_text())]


def collate(batch: list[Encoded], pad_id: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def total_steps(hp: Hyperparameters, n_train: int) -> int:
    if hp.max_steps:
        return hp.max_steps
    return max(1, math.ceil(hp.epochs * n_train / hp.batch_size))


def batch_at(step: int, examples: list[Encoded], batch_size: int, seed: int) -> list[Encoded]:
    """The examples of optimizer step `step` (0-based): a fresh shuffle per epoch, so a resumed
    job sees exactly the batches it would have seen."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, len(examples))
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(examples[order[pos]])
    return out


@torch.no_grad()
def evaluate(
    model: Any, examples: list[Encoded], pad_id: int, batch_size: int, device: str = "cpu"
) -> float:
    """Mean loss per answer token over the held-out examples."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        shift_labels = batch["labels"][:, 1:].reshape(-1)
        total += torch.nn.functional.cross_entropy(
            shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum"
        ).item()
        tokens += int((shift_labels != IGNORE).sum())
    model.train()
    return total / max(tokens, 1)


class StopFlag:
    """Set by SIGTERM or SIGUSR1: finish the step, write a checkpoint, exit."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, signum, _frame) -> None:
        self.signal = signum


class Trainer:
    """One run of a job, from its latest checkpoint (if any) to the end or a stop signal."""

    def __init__(self, job: TrainingJob, directory: Path, device: str = "cpu"):
        self.job = job
        self.dir = directory
        self.hp = job.hyperparameters
        self.device = device
        self.progress_file = directory / "progress.json"
        self.checkpoints = directory / "checkpoints"
        self.stop = StopFlag()

    # ----- progress ---------------------------------------------------------------------

    def write_progress(self, **fields) -> None:
        current = read_json_object(self.progress_file) or {
            "job_id": self.job.id,
            "model": self.job.model,
            "user": self.job.user,
            "started_at": time.time(),
        }
        write_json(self.progress_file, {**current, **fields, "updated_at": time.time()})

    # ----- checkpoints ------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        done = sorted(self.checkpoints.glob("step-*[0-9]"))
        return done[-1] if done else None

    def save_checkpoint(self, model, optimizer, scheduler, step: int, extra: dict) -> None:
        """Adapter weights, optimizer and schedule state, RNG: written to a temporary folder
        and renamed, so a kill while writing leaves the previous checkpoint intact."""
        self.checkpoints.mkdir(exist_ok=True)
        final = self.checkpoints / f"step-{step:07d}"
        tmp = self.checkpoints / f".tmp-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "torch_rng": torch.get_rng_state(),
                **extra,
            },
            tmp / "trainer_state.pt",
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(self.checkpoints.glob("step-*[0-9]"))[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        self.write_progress(checkpoint_step=step)

    # ----- the run ----------------------------------------------------------------------

    def run(self) -> dict:
        """Train to the end; the evaluation of base and tuned model. Raises Stopped."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

        hp = self.hp
        torch.manual_seed(hp.seed)
        tokenizer = AutoTokenizer.from_pretrained(self.job.base_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        train = read_examples(self.dir / "train.jsonl", tokenizer)
        held_out = read_examples(self.dir / "eval.jsonl", tokenizer)
        # bf16 on a GPU (what such models are trained in); float32 on CPU, where bf16 is slow.
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(self.job.base_dir, dtype=dtype)
        lora = LoraConfig(
            r=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora).to(self.device)
        steps = total_steps(hp, len(train))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=0.0)
        scheduler = get_scheduler(
            hp.schedule if hp.schedule != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=int(hp.warmup_fraction * steps),
            num_training_steps=steps,
        )

        step, extra = 0, {}
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None:
            set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
            state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            step = state["step"]
            extra = {"base_eval_loss": state.get("base_eval_loss")}
            log.info("resumed from %s (step %d of %d)", checkpoint.name, step, steps)
            self.write_progress(
                state="running",
                resumed_from=step,
                resumes=(read_json_object(self.progress_file) or {}).get("resumes", 0) + 1,
            )
        if extra.get("base_eval_loss") is None:
            self.write_progress(state="evaluating", step=0, total_steps=steps)
            with model.disable_adapter():
                extra["base_eval_loss"] = evaluate(
                    model, held_out, pad_id, hp.batch_size, self.device
                )
            log.info("base model: held-out loss %.4f", extra["base_eval_loss"])
        self.write_progress(
            state="running",
            total_steps=steps,
            device=self.device,
            base_eval_loss=extra["base_eval_loss"],
        )

        model.train()
        window_tokens, window_start = 0, time.monotonic()
        while step < steps:
            batch = collate(batch_at(step, train, hp.batch_size, hp.seed), pad_id, self.device)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += int(batch["attention_mask"].sum())
            elapsed = time.monotonic() - window_start
            point = {"step": step, "loss": loss.item(), "learning_rate": scheduler.get_last_lr()[0]}
            with (self.dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(point) + "\n")
            self.write_progress(
                step=step,
                loss=round(loss.item(), 5),
                learning_rate=scheduler.get_last_lr()[0],
                tokens_per_s=round(window_tokens / elapsed, 1) if elapsed > 0 else None,
            )
            if step % hp.checkpoint_every == 0 or self.stop.signal is not None:
                self.save_checkpoint(model, optimizer, scheduler, step, extra)
            if self.stop.signal is not None and step < steps:
                self.write_progress(state="stopped")
                raise Stopped(f"stopped by signal {self.stop.signal} after step {step}")
        self.write_progress(state="evaluating")
        tuned = evaluate(model, held_out, pad_id, hp.batch_size, self.device)
        base_loss = extra["base_eval_loss"]
        result = {
            "base_eval_loss": base_loss,
            "base_perplexity": math.exp(min(base_loss, 50)),
            "tuned_eval_loss": tuned,
            "tuned_perplexity": math.exp(min(tuned, 50)),
            "eval_examples": len(held_out),
            "train_examples": len(train),
            "steps": steps,
        }
        log.info("tuned model: held-out loss %.4f (base %.4f)", tuned, base_loss)
        self.model, self.tokenizer = model, tokenizer
        return result
