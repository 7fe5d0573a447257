"""The end of a fine-tuning job: the result written to memory (/dev/shm where there is one),
imported encrypted into the store and added to the catalog. For a base model whose instances
serve LoRA adapters (`lora: true` in the catalog) the result is the adapter, served on the base
model's instances; otherwise the adapter is merged into the base weights and the result is a
model of its own. The plaintext result never lands on a disk."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from appliance.config import ApplianceSettings
from appliance.models.catalog import ModelResources, ModelSpec, load_catalog
from appliance.store import keyring
from appliance.store.publish import publish_checkpoint
from appliance.training.jobs import TrainingJob

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MEMORY_DIR = Path("/dev/shm")
ADAPTER_CONFIG = "adapter_config.json"


def _write_adapter(model: Any, base: str, work: Path) -> None:
    """adapter_model.safetensors and adapter_config.json, naming the catalog's base model (what
    an instance checks before it loads the adapter)."""
    model.save_pretrained(work, safe_serialization=True)
    config = json.loads((work / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = base
    (work / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))


def _write_merged(model: Any, base_dir: Path, work: Path) -> None:
    model.merge_and_unload().save_pretrained(work, safe_serialization=True)
    # Tokenizer, chat template and generation settings come from the base model unchanged.
    for item in base_dir.iterdir():
        if (
            item.is_file()
            and not item.name.endswith(WEIGHT_SUFFIXES)
            and not item.name.endswith(".index.json")
            and not (work / item.name).exists()
        ):
            shutil.copy2(item, work / item.name)


def publish_tuned(settings: ApplianceSettings, job: TrainingJob, model: Any) -> ModelSpec:
    """Store the result as `job.output_model`; its catalog entry."""

    base_spec = load_catalog(settings).get(job.model)
    as_adapter = bool(base_spec and base_spec.lora)
    work = Path(
        tempfile.mkdtemp(
            prefix=f"appliance-{job.id}-", dir=MEMORY_DIR if MEMORY_DIR.is_dir() else None
        )
    )
    try:
        if as_adapter:
            _write_adapter(model, job.model, work)
        else:
            _write_merged(model, Path(job.base_dir), work)
        kind = "LoRA adapter" if as_adapter else "merged"
        return publish_checkpoint(
            settings,
            work,
            job.output_model,
            encrypt=settings.store.encrypt,
            policy=lambda: keyring.sign_policy(settings, job.output_model),
            max_model_len=base_spec.max_model_len if base_spec else 2048,
            resources=base_spec.resources if base_spec else ModelResources(),
            description=f"{job.model} fine-tuned by {job.user} ({job.id}, {kind})",
            base_model=job.model if as_adapter else None,
            training_job=job.id,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
