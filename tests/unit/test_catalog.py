"""The model catalog: presets, operator additions, and clear errors for broken files."""

from __future__ import annotations

import pytest

from appliance.config import load_settings
from appliance.errors import ApplianceError
from appliance.models.catalog import ModelSpec, add_local_model, load_catalog


@pytest.fixture
def settings(tmp_path):
    return load_settings(state_dir=tmp_path)


def test_presets_include_tiny_real_and_embedding_models(settings):
    catalog = load_catalog(settings)
    assert "tiny-chat" in catalog
    kinds = {m.kind for m in catalog}
    assert {"chat", "embedding"} <= kinds
    big = [m for m in catalog if m.resources.gpus >= 1]
    assert any(m.parameters.startswith(("7", "8")) for m in big)
    assert any(m.parameters.startswith(("13", "14")) for m in big)
    for m in catalog:
        assert m.description and m.max_model_len >= 256


def test_uninstalled_preset_reported(settings):
    catalog = load_catalog(settings)
    assert not catalog.get("llama-3.1-8b-instruct").installed(settings)


def test_add_local_model_roundtrip(settings, tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    add_local_model(settings, ModelSpec(name="mine", source=f"dir:{model_dir}", path=model_dir))
    catalog = load_catalog(settings)
    assert catalog.get("mine").installed(settings)
    # Adding again replaces, never duplicates.
    add_local_model(settings, ModelSpec(name="mine", source=f"dir:{model_dir}", max_model_len=99))
    assert load_catalog(settings).get("mine").max_model_len == 99


def test_broken_catalog_names_model_and_field(tmp_path):
    bad = tmp_path / "cat.yaml"
    bad.write_text("models:\n  - name: x\n    source: dir:/x\n    resources: {gpus: -1}\n")
    settings = load_settings(state_dir=tmp_path, catalog={"files": [str(bad)]})
    with pytest.raises(ApplianceError, match=r"model x: resources.gpus"):
        load_catalog(settings)


def test_catalog_file_overrides_preset(tmp_path):
    f = tmp_path / "cat.yaml"
    f.write_text(
        "models:\n  - name: tiny-chat\n    source: dir:/elsewhere\n    max_model_len: 128\n"
    )
    settings = load_settings(state_dir=tmp_path, catalog={"files": [str(f)]})
    assert load_catalog(settings).get("tiny-chat").max_model_len == 128


def test_cli_models_add_and_list(tmp_path, monkeypatch, capsys):
    from appliance.cli.main import main

    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path / "state"))
    assert main(["models", "add", "my-model", str(model_dir), "--max-model-len", "2048"]) == 0
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("my-model"))
    assert row.split()[-1] == "yes"
    # Not a model directory: a clear error, nothing added.
    (tmp_path / "empty").mkdir()
    assert main(["models", "add", "broken", str(tmp_path / "empty")]) == 2
    assert "has no config.json" in capsys.readouterr().err
