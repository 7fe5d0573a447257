"""LoRA adapters in the encrypted store, served by their base model's vLLM instances. The
instance's vLLM gets a LoRA resolver: when a request names an adapter it has not loaded, the
resolver opens it in the store (load policy, key and integrity checked as for any stored model),
checks that it was trained on this instance's base model, decrypts it into memory (/dev/shm)
and hands vLLM that folder."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance.config import ApplianceSettings
from appliance.names import MODEL_NAME
from appliance.store.format import HEADER_FILE
from appliance.store.keyring import load_spec
from appliance.store.loader import load_to_host
from appliance.store.vllm_plugin import StoreLoadSpec, materialize_model_files

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_store_json(settings: ApplianceSettings, base: str) -> str:
    """What an instance of `base` needs to open its adapters (the launcher's --lora-store)."""

    template = asdict(load_spec(settings, base))
    return json.dumps(
        {"base": base, "store_root": str(settings.store_root), "spec": template},
        sort_keys=True,
        separators=(",", ":"),
    )


def materialize_adapter(config: dict[str, Any], name: str) -> Path | None:
    """The adapter `name` decrypted into a private folder in memory, or None when the store
    has no adapter of that name for this base model."""
    import torch
    from safetensors.torch import save_file

    if not MODEL_NAME.fullmatch(name):
        return None
    model_dir = Path(config["store_root"]) / name
    if not (model_dir / HEADER_FILE).exists():
        return None
    spec = StoreLoadSpec.from_dict(
        {**config["spec"], "model_dir": str(model_dir), "model_id": name}
    )
    stored = spec.open()  # refuses a wrong key, an expired or foreign policy, altered bytes
    adapter = json.loads(stored.index.files.get(ADAPTER_CONFIG, b"{}"))
    if adapter.get("base_model_name_or_path") != config["base"]:
        log.warning("%s is not an adapter of %s; not loaded", name, config["base"])
        return None
    path = materialize_model_files(stored)  # adapter_config.json
    try:
        flat, views = load_to_host(stored)
        save_file({k: v.contiguous() for k, v in views.items()}, str(path / ADAPTER_WEIGHTS))
        del views
        with torch.no_grad():
            flat.zero_()
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    atexit.register(shutil.rmtree, path, True)
    return path


def register_resolver(raw_config: str) -> None:
    """Make vLLM resolve adapter names through the store (called in vLLM's plugin hook)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    config = json.loads(raw_config)

    class StoreLoraResolver(LoRAResolver):
        """Finds adapters of this instance's base model in the encrypted store."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            path = await asyncio.to_thread(materialize_adapter, config, lora_name)
            if path is None:
                return None
            log.info("loaded LoRA adapter %s of %s from the store", lora_name, config["base"])
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    LoRAResolverRegistry.register_resolver("appliance-store", StoreLoraResolver())
