"""Re-scoring of retrieved chunks against the query with a local cross-encoder."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from appliance.rag.models import Device, load_model, resolve_device

from appliance.config.rag import RagSettings


class Reranker:
    """Scores (query, chunk) pairs jointly: slower than comparing vectors, often more precise."""

    def __init__(self, model_dir: Path, device: Device = "auto", batch_size: int = 32) -> None:
        self.model_dir = model_dir
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_settings(cls, settings: RagSettings) -> Reranker | None:
        """The configured reranker, or None when reranking is off."""
        if settings.reranker_model is None:
            return None
        return cls(settings.reranker_model, settings.embedding_device)

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        """One relevance score per text (higher is more relevant), in order."""
        if not texts:
            return []
        pairs = [(query, text) for text in texts]
        scores = self._model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        return [float(score) for score in scores]

    @cached_property
    def _model(self):
        setting = "rag.reranker_model"
        return load_model("cross-encoder", self.model_dir, resolve_device(self.device), setting)
