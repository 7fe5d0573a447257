"""Puts a checkpoint into the store (encrypted unless the store is set to plaintext), checks it
bit for bit, and adds it to the catalog: what `appliance models import` and a finished
fine-tuning job both do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from appliance.config import ApplianceSettings
from appliance.models.catalog import ModelResources, ModelSpec, add_local_model
from appliance.security.policy import SignedPolicy
from appliance.store import keyring
from appliance.store.importer import import_checkpoint


def publish_checkpoint(
    settings: ApplianceSettings,
    directory: Path,
    name: str,
    *,
    encrypt: bool,
    policy: Callable[[], SignedPolicy],
    max_model_len: int,
    resources: ModelResources,
    description: str = "",
    base_model: str | None = None,
    training_job: str | None = None,
    replace: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = lambda _line: None,
) -> ModelSpec:
    """Import `directory` as store model `name`; its catalog entry. `policy` is only asked for
    (and keys only made) when the weights are encrypted."""

    kek = signed = None
    if encrypt:
        for line in keyring.init_keys(settings):
            say(line)
        kek = keyring.store_kek(settings, create_kdf=True)
        signed = policy()
    path = import_checkpoint(
        directory,
        settings.store_root,
        name,
        kek=kek,
        policy=signed,
        chunk_bytes=settings.store.chunk_mib << 20,
        progress=progress,
        replace=replace,
    )
    spec = ModelSpec(
        name=name,
        description=description,
        source=f"store:{name}",
        max_model_len=max_model_len,
        size_gb=round(sum(f.stat().st_size for f in path.iterdir()) / 1e9, 3),
        resources=resources,
        base_model=base_model,
        training_job=training_job,
    )
    add_local_model(settings, spec)
    return spec
