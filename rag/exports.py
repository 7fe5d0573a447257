"""ONNX exports of the embedding model, made offline from its local weights into a cache
directory, atomically, checked against their manifest on every load and remade when damaged."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

from appliance.errors import ApplianceError
from appliance.file_lock import flocked
from appliance.hashing import file_sha256

log = logging.getLogger(__name__)

ExportKind = Literal["float32", "int8"]
FILES: dict[ExportKind, str] = {"float32": "model.onnx", "int8": "model-int8.onnx"}
MANIFEST = "manifest.json"
# Bumped when the exported graph changes, so older exports are made again rather than reused.
FORMAT = 1
# The model's files that decide what an export holds: weights, architecture, tokenizer, pooling.
_SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")


class ExportError(ApplianceError):
    """The embedding model could not be exported (named setting, reason)."""


def export_dir(model_dir: Path, cache_dir: Path) -> Path:
    """Where the exports of `model_dir` live: named after the model and a digest of its files,
    so a changed model gets new exports and never reuses stale ones."""
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    for name in _SOURCE_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name} {file_sha256(path)}\n".encode())
    return cache_dir / f"{model_dir.name}-{digest.hexdigest()[:16]}"


def ensure_export(model_dir: Path, cache_dir: Path, kind: ExportKind) -> Path:
    """The path of the `kind` export of `model_dir`, made first if missing or damaged.

    Processes that start together make it once: a lock file serialises them, and the export is
    written into a temporary folder that is renamed into place whole, so a crash never leaves a
    half-written export where a later start would take it for a good one.
    """
    if not (model_dir / "config.json").is_file():
        raise ExportError(
            f"rag.embedding_model: {model_dir} is not a local model directory (no config.json)"
        )
    target = export_dir(model_dir, cache_dir)
    with flocked(cache_dir / ".export.lock"):
        if target.exists() and not intact(target):
            log.warning(
                "the embedding export in %s is damaged or incomplete: making it again", target
            )
            shutil.rmtree(target)
        if not target.exists():
            _make(model_dir, target)
    return target / FILES[kind]


def intact(target: Path) -> bool:
    """Whether every file of the export is there with the digest its manifest records."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        files = manifest["files"]
        return set(files) == set(FILES.values()) and all(
            file_sha256(target / name) == digest for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _make(model_dir: Path, target: Path) -> None:
    log.info("exporting the embedding model %s to ONNX in %s (once)", model_dir, target)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        float32, int8 = work / FILES["float32"], work / FILES["int8"]
        _export_float32(model_dir, float32)
        _quantize_int8(float32, int8)
        files = {path.name: file_sha256(path) for path in (float32, int8)}
        manifest = {"format": FORMAT, "model_dir": str(model_dir), "files": files}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for path in work.iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _export_float32(model_dir: Path, path: Path) -> None:
    """The transformer and its mean pooling as one ONNX graph: (input_ids, attention_mask) ->
    sentence vector, not yet normalized (the embedder normalizes every backend's output alike)."""
    import torch
    from transformers import AutoModel

    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ExportError(
            f"rag.embedding_model: {model_dir} does not use mean pooling; only the torch backend "
            "(rag.embedding_backend: torch) runs it"
        )
    # Eager attention traces into plain ONNX operators; the fused kernels do not export.
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager", local_files_only=True)

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.eval()

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    # Two texts of different lengths: the traced graph must not fix batch or sequence sizes.
    sample = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    mask = (sample != 0).long()
    dynamic = {0: "batch", 1: "tokens"}
    # The tracer warns about shape-dependent Python in the attention mask code; the traced graph
    # was checked against torch on other batch and text sizes (tests/unit/test_rag_backends.py).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            MeanPooled(),
            (sample, mask),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": dynamic,
                "attention_mask": dynamic,
                "embedding": {0: "batch"},
            },
            opset_version=17,
        )


def _quantize_int8(float32: Path, int8: Path) -> None:
    """Weights in int8 per output channel, activations quantized on the fly (dynamic
    quantization: no calibration data needed, so nothing but the weights goes in)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # It logs advice to pre-process the model at WARNING on the root logger: nothing to act on.
    root = logging.getLogger()
    was_disabled, root.disabled = root.disabled, True
    try:
        quantize_dynamic(str(float32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.disabled = was_disabled
