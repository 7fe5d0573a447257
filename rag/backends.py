"""Runners of the embedding model's ONNX export on CPU: ONNX Runtime and OpenVINO, each with
the model's own tokenizer, loaded once per process and shared."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from appliance.rag.exports import ExportKind, ensure_export, export_dir

from appliance import envs

if TYPE_CHECKING:
    import numpy as np

RuntimeName = Literal["onnx", "openvino"]

_cache: dict[tuple, ExportRunner] = {}
_cache_lock = threading.Lock()


class ExportRunner:
    """Sentence vectors (not normalized) of texts from an ONNX export, and its token counts."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        # The limits sentence-transformers applies: its max_seq_length, the tokenizer's padding.
        config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.max_tokens = int(config["max_seq_length"])
        self.dimension = int(
            json.loads((model_dir / "1_Pooling" / "config.json").read_text())[
                "word_embedding_dimension"
            ]
        )
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_tokens)
        pad = json.loads((model_dir / "tokenizer_config.json").read_text()).get(
            "pad_token", "[PAD]"
        )
        self._tokenizer.enable_padding(pad_id=self._tokenizer.token_to_id(pad), pad_token=pad)

    @property
    def max_seq_length(self) -> int:
        """Tokens read per text (sentence-transformers' name for it)."""
        return self.max_tokens

    def get_embedding_dimension(self) -> int:
        return self.dimension

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask, padded to the longest text, truncated to the window."""
        import numpy as np

        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(self.tokenize(texts))

    def _run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class OnnxRuntimeRunner(ExportRunner):
    """The export run by ONNX Runtime's CPU provider."""

    def __init__(self, model_dir: Path, export: Path) -> None:
        super().__init__(model_dir)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # its warnings about unused initializers are noise
        self._session = onnxruntime.InferenceSession(
            str(export), options, providers=["CPUExecutionProvider"]
        )

    def _run(self, features):
        # InferenceSession.run is safe to call from several threads at once.
        return self._session.run(None, features)[0]


class OpenVinoRunner(ExportRunner):
    """The export compiled by OpenVINO for this CPU, in float32 or bfloat16 arithmetic."""

    def __init__(self, model_dir: Path, export: Path, bfloat16: bool) -> None:
        super().__init__(model_dir)
        import openvino

        core = openvino.Core()
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32",
        }
        self._compiled = core.compile_model(core.read_model(str(export)), "CPU", config)
        self._output = self._compiled.outputs[0]
        # An infer request serves one call at a time; each thread gets its own.
        self._local = threading.local()

    def _run(self, features):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        return request.infer(features)[self._output].copy()


def load_runner(
    runtime: RuntimeName, model_dir: Path, cache_dir: Path, kind: ExportKind, bfloat16: bool
) -> ExportRunner:
    """The runner of `model_dir`'s export, made (once) in `cache_dir` if need be, then reused by
    the whole process."""
    key = (runtime, model_dir.resolve(), cache_dir.resolve(), kind, bfloat16)
    with _cache_lock:
        if key not in _cache:
            # Nothing is downloaded: transformers reads only the local weights to export them.
            os.environ.update(envs.OFFLINE_ENV)
            export = ensure_export(model_dir, cache_dir, kind)
            try:
                runner = _open(runtime, model_dir, export, bfloat16)
            except Exception:
                # A file that matches its manifest but does not load (a runtime change): the
                # export is made again once from the weights; a second failure is reported.
                _discard(model_dir, cache_dir)
                runner = _open(
                    runtime, model_dir, ensure_export(model_dir, cache_dir, kind), bfloat16
                )
            _cache[key] = runner
        return _cache[key]


def _open(runtime: RuntimeName, model_dir: Path, export: Path, bfloat16: bool) -> ExportRunner:
    if runtime == "onnx":
        return OnnxRuntimeRunner(model_dir, export)
    return OpenVinoRunner(model_dir, export, bfloat16)


def _discard(model_dir: Path, cache_dir: Path) -> None:
    import shutil

    shutil.rmtree(export_dir(model_dir, cache_dir), ignore_errors=True)
