"""The end of a fine-tuning job: the adapter merged into the base weights, written to memory
(/dev/shm where there is one) and imported encrypted into the store, then added to the catalog.
The merged plaintext weights never land on a disk."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from appliance.config import ApplianceSettings
from appliance.models.catalog import ModelResources, ModelSpec, load_catalog
from appliance.store.publish import publish_checkpoint
from appliance.training.jobs import TrainingJob

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MEMORY_DIR = Path("/dev/shm")


def publish_tuned(settings: ApplianceSettings, job: TrainingJob, model: Any) -> ModelSpec:
    """Store the merged model as `job.output_model`; its catalog entry."""
    from appliance.store import keyring

    base_spec = load_catalog(settings).get(job.model)
    merged = model.merge_and_unload()
    work = Path(tempfile.mkdtemp(prefix=f"appliance-{job.id}-",
                                 dir=MEMORY_DIR if MEMORY_DIR.is_dir() else None))  # fmt: skip
    try:
        merged.save_pretrained(work, safe_serialization=True)
        # Tokenizer, chat template and generation settings come from the base model unchanged.
        for item in Path(job.base_dir).iterdir():
            if (
                item.is_file()
                and not item.name.endswith(WEIGHT_SUFFIXES)
                and not (work / item.name).exists()
                and not item.name.endswith(".index.json")
            ):
                shutil.copy2(item, work / item.name)
        return publish_checkpoint(
            settings,
            work,
            job.output_model,
            encrypt=settings.store.encrypt,
            policy=lambda: keyring.sign_policy(settings, job.output_model),
            max_model_len=base_spec.max_model_len if base_spec else 2048,
            resources=base_spec.resources if base_spec else ModelResources(),
            description=f"{job.model} fine-tuned by {job.user} ({job.id})",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
