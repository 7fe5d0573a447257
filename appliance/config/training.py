"""Configuration of fine-tuning jobs: default hyperparameters, limits and job resources."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Hyperparameters(BaseModel):
    """LoRA fine-tuning hyperparameters; every field has a default that works for chat data."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    epochs: float = Field(default=3.0, gt=0, le=100)
    """Passes over the training examples (ignored when `max_steps` is set)."""

    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    """Optimizer steps to run, overriding `epochs`."""

    batch_size: int = Field(default=4, ge=1, le=1024)
    """Examples per optimizer step."""

    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate of the LoRA weights (AdamW)."""

    warmup_fraction: float = Field(default=0.05, ge=0, le=0.5)
    """Share of the steps over which the learning rate rises linearly from 0."""

    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """Decay of the learning rate after warm-up."""

    lora_rank: int = Field(default=16, ge=1, le=512)
    """Rank r of the low-rank update of each adapted weight matrix."""

    lora_alpha: float = Field(default=32.0, gt=0)
    """Scale of the update (alpha / r)."""

    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter's input during training."""

    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Which weight matrices get an adapter: "all-linear" or module names (q_proj, v_proj)."""

    max_seq_len: int = Field(default=1024, ge=16, le=131072)
    """Longest example in tokens (prompt and answer); longer ones are refused at upload."""

    eval_fraction: float = Field(default=0.1, gt=0, le=0.5)
    """Share of the examples held out to evaluate base and tuned model (at least one)."""

    checkpoint_every: int = Field(default=20, ge=1)
    """Steps between checkpoints; a preempted or killed job resumes from the latest one."""

    seed: int = 0
    """Seed of the split, the example order and the adapter's initialisation."""


class TrainingSettings(BaseModel):
    """Fine-tuning jobs on the cluster."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    defaults: Hyperparameters = Field(default_factory=Hyperparameters)
    """Hyperparameters a job gets unless it sets its own."""

    max_dataset_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    """Largest dataset file accepted."""

    min_examples: int = Field(default=4, ge=2)
    """Fewest valid examples a dataset needs (some are held out)."""

    cpus: int = Field(default=2, ge=1)
    """CPUs of a training job."""

    memory_gb: float = Field(default=4.0, gt=0)
    """Memory of a training job on a CPU node, in GB (GPU jobs add the model's size)."""

    gpus: int | None = Field(default=None, ge=0)
    """GPUs of a training job; None: one if the cluster has GPUs and the base model needs
    them, else CPU."""

    max_restarts: int = Field(default=3, ge=0, le=100)
    """Times the trainer is restarted from its last checkpoint inside one job when it dies
    (killed, out of memory), before the job fails."""
