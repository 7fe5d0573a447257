"""The embedding model's CPU backends: the ONNX export is made offline from the shipped weights,
loads in ONNX Runtime and OpenVINO, gives torch's vectors, and is remade when damaged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from appliance.rag.embeddings import Embedder, cpu_has_native_bfloat16, default_model_dir
from appliance.rag.exports import FILES, MANIFEST, ensure_export, export_dir, intact
from pydantic import ValidationError

from appliance.config import ApplianceSettings
from appliance.config.rag import RagSettings
from appliance.gateway.metering import MeteredEmbedder

TEXTS = [
    "The pump bearings are greased every 500 hours.",
    "Quarterly revenue rose by 4%.",
    "x",
    # Longer than the model's window of 256 tokens: truncated the same way by every backend.
    "Slurm schedules each model instance as a job on the cluster. " * 60,
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, monkeypatch_module):
    # No hub: an export that tried to download anything would fail here.
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HOME", str(tmp_path_factory.mktemp("empty-hf-home")))
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def torch_vectors():
    return Embedder(device="cpu", backend="torch", precision="float32").embed(TEXTS)


@pytest.mark.parametrize(
    ("backend", "precision", "least_cosine"),
    [
        ("onnx", "float32", 0.9999),
        ("openvino", "float32", 0.9999),
        ("openvino", "bfloat16", 0.999),
        # int8 weights move vectors more (the one-letter text most), hence a looser bound; its
        # effect on retrieval is measured in benchmarks/embedding_backends.py.
        ("onnx", "int8", 0.97),
    ],
)
def test_export_backends_give_torch_vectors(
    cache_dir, torch_vectors, backend, precision, least_cosine
):
    embedder = Embedder(
        device="cpu", backend=backend, precision=precision, cache_dir=cache_dir, batch_size=3
    )
    assert embedder.runtime == (backend, precision)
    vectors = embedder.embed(TEXTS)  # batches of 3 and 1: padding differs from torch's batch
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    assert embedder.dimension == 384
    assert np.allclose((vectors**2).sum(axis=1), 1.0, atol=1e-4)
    cosines = (vectors * torch_vectors).sum(axis=1)
    assert cosines.min() > least_cosine
    assert cosines.mean() > 0.99


def test_export_is_made_once_from_the_shipped_weights(cache_dir):
    model = default_model_dir()
    path = ensure_export(model, cache_dir, "float32")
    target = export_dir(model, cache_dir)
    assert path == target / FILES["float32"]
    assert intact(target)
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["model_dir"] == str(model)
    assert set(manifest["files"]) == set(FILES.values())
    made = path.stat().st_mtime_ns
    assert ensure_export(model, cache_dir, "int8") == target / FILES["int8"]
    assert path.stat().st_mtime_ns == made  # reused, not made again
    # Nothing half-written is left beside it.
    assert [p.name for p in cache_dir.iterdir() if not p.name.startswith(".export")] == [
        target.name
    ]


@pytest.mark.parametrize("damage", ["truncated", "manifest missing", "file missing"])
def test_a_damaged_or_partial_export_is_made_again(tmp_path, damage):
    model = default_model_dir()
    ensure_export(model, tmp_path, "float32")
    target = export_dir(model, tmp_path)
    if damage == "truncated":
        with (target / FILES["float32"]).open("r+b") as f:
            f.truncate(1000)
    elif damage == "manifest missing":
        (target / MANIFEST).unlink()  # as a copy interrupted before its end would leave it
    else:
        (target / FILES["int8"]).unlink()
    assert not intact(target)
    ensure_export(model, tmp_path, "float32")
    assert intact(target)
    vectors = Embedder(device="cpu", backend="onnx", cache_dir=tmp_path).embed(TEXTS[:2])
    assert vectors.shape == (2, 384)


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path):
    from appliance.rag.exports import ExportError

    with pytest.raises(ExportError, match=r"rag\.embedding_model: .* \(no config\.json\)"):
        ensure_export(tmp_path, tmp_path / "cache", "float32")


def test_auto_picks_openvino_on_cpu_in_the_cpus_best_arithmetic():
    embedder = Embedder(device="cpu")
    expected = "bfloat16" if cpu_has_native_bfloat16() else "float32"
    assert embedder.runtime == ("openvino", expected)
    assert Embedder(device="cpu", backend="onnx").runtime == ("onnx", "float32")
    # On a GPU node the model stays in PyTorch on the GPU (resolving names no device here).
    assert Embedder(device="cuda").runtime == ("torch", "float32")
    with pytest.raises(ValueError, match="runs on CPU only"):
        _ = Embedder(device="cuda", backend="openvino").runtime
    assert Embedder(device="cpu", backend="torch", precision="float32").runtime == (
        "torch",
        "float32",
    )


def test_tokens_are_counted_alike_by_every_backend(cache_dir):
    texts = ["hello world", "a story about the sea and its ships", "word " * 5000]
    counts = {
        backend: MeteredEmbedder(device="cpu", backend=backend, cache_dir=cache_dir).count_tokens(
            texts
        )
        for backend in ("torch", "onnx", "openvino")
    }
    assert counts == {backend: 4 + 10 + 256 for backend in counts}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"embedding_precision": "int8"}, "int8 needs embedding_backend onnx"),
        (
            {"embedding_precision": "int8", "embedding_backend": "openvino"},
            "int8 needs embedding_backend onnx",
        ),
        (
            {"embedding_precision": "bfloat16", "embedding_backend": "onnx"},
            "bfloat16 is not available with embedding_backend onnx",
        ),
        (
            {"embedding_device": "cuda", "embedding_backend": "openvino"},
            "openvino runs on CPU only",
        ),
        ({"embedding_backend": "tensorrt"}, "embedding_backend"),
    ],
)
def test_backend_settings_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        RagSettings(**fields)


def test_backend_settings_that_fit_are_taken():
    RagSettings(embedding_backend="onnx", embedding_precision="int8")
    RagSettings(embedding_backend="openvino", embedding_precision="bfloat16")
    RagSettings(embedding_backend="auto", embedding_device="cuda")


def test_exports_are_kept_in_the_state_directorys_cache(tmp_path):
    settings = ApplianceSettings(state_dir=tmp_path)
    assert settings.rag.embedding_cache_dir == tmp_path / "cache" / "embeddings"
    chosen = ApplianceSettings(state_dir=tmp_path, rag={"embedding_cache_dir": tmp_path / "x"})
    assert chosen.rag.embedding_cache_dir == tmp_path / "x"
    assert Embedder.from_settings(settings.rag).cache_dir == tmp_path / "cache" / "embeddings"
