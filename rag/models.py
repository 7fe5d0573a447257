"""Local sentence-transformers models, loaded offline once per process and shared."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

from appliance import envs
from appliance.errors import ApplianceError

Device = Literal["auto", "cpu", "cuda"]
ModelKind = Literal["embedder", "cross-encoder"]

_cache: dict[tuple[ModelKind, Path, str], Any] = {}
_cache_lock = threading.Lock()


def resolve_device(device: Device) -> str:
    """`cuda` or `cpu`: `auto` picks the GPU when this process can use one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(kind: ModelKind, model_dir: Path, device: str, setting: str) -> Any:
    """The model in `model_dir` on `device`, loaded on first use and then reused.

    `setting` names the configuration field the directory came from, for the error when it is
    not a model directory: a hub name there would mean a download, which never happens.
    """
    key = (kind, model_dir.resolve(), device)
    # One lock for all loads: two threads must not load the same weights twice, and loads are
    # rare (once per model and device for the life of the process).
    with _cache_lock:
        if key not in _cache:
            if not (model_dir / "config.json").is_file():
                raise ApplianceError(
                    f"{setting}: {model_dir} is not a local model directory (no config.json)"
                )
            # huggingface_hub reads HF_HUB_OFFLINE once, when first imported, so set it before
            # the import; the stack never downloads at run time, so it may stay set.
            os.environ.update(envs.OFFLINE_ENV)
            from sentence_transformers import CrossEncoder, SentenceTransformer

            model_class = SentenceTransformer if kind == "embedder" else CrossEncoder
            _cache[key] = model_class(str(model_dir), device=device)
        return _cache[key]
