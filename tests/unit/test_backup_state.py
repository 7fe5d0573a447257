"""`appliance backup`, `backup verify` and `restore` on a state directory: what goes in, where it
comes back (modes included), and refusals that write nothing."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest
import torch
from appliance.security.api_keys import ApiKeyStore
from appliance.security.audit import AuditLog
from appliance.security.keys import generate_key_file
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from appliance.cli.main import main
from appliance.config import ApplianceSettings, load_settings
from appliance.config.training import Hyperparameters
from appliance.models.catalog import load_catalog
from appliance.store.keyring import load_spec
from appliance.store.loader import load_to_host
from appliance.training.jobs import TrainingJob, new_job_id
from appliance.training.publish import publish_tuned


def _config(path: Path, state: Path) -> Path:
    path.write_text(f"state_dir: {state}\n")
    return path


@pytest.fixture
def host(tmp_path, capsys):
    """A state directory with a little of everything, and a runner for the CLI."""
    config = _config(tmp_path / "config.yaml", tmp_path / "state")
    settings = load_settings(config)
    layout = settings.layout
    layout.keys.mkdir(parents=True, mode=0o700)
    generate_key_file(settings.kek_file)
    secret, _ = ApiKeyStore(settings.api_keys_file).create("alice")
    AuditLog(settings.audit_dir).append("cli:test", "key_create", "alice")
    layout.usage_db.parent.mkdir(mode=0o700)
    with sqlite3.connect(layout.usage_db) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE usage (user TEXT, tokens INTEGER)")
        db.execute("INSERT INTO usage VALUES ('alice', 42)")
    (settings.conversations_dir / "u1").mkdir(parents=True)
    (settings.conversations_dir / "u1" / "c1.json").write_text('{"messages": []}')
    (settings.training_dir / "files").mkdir(parents=True)
    (settings.training_dir / "files" / "file-1.jsonl").write_text('{"messages": []}\n')
    model = settings.store_root / "tiny"
    model.mkdir(parents=True)
    (model / "header.json").write_text('{"wrapped_key": "..."}')
    (model / "tensors.bin").write_bytes(os.urandom(4096))
    (layout.logs).mkdir()
    (layout.logs / "gateway.log").write_text("not kept")

    def run(*args: str, config_file: Path = config):
        rc = main(["--config", str(config_file), *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    run.settings, run.secret, run.tmp = settings, secret, tmp_path
    return run


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_backup_verify_restore_round_trip(host):
    dest = host.tmp / "backup.appliance"
    rc, out, err = host("backup", str(dest))
    assert rc == 0, err
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert "keys" in out and "rag" not in out  # no knowledge base yet
    rc, out, err = host("backup", "verify", str(dest))
    assert rc == 0 and "backup intact" in out, err

    config2 = _config(host.tmp / "config2.yaml", host.tmp / "restored")
    rc, out, err = host(
        "restore", str(dest), "--key-file", str(host.settings.kek_file), config_file=config2
    )
    assert rc == 0, err
    settings2 = load_settings(config2)
    assert ApiKeyStore(settings2.api_keys_file).authenticate(host.secret).user == "alice"
    verification = AuditLog(settings2.audit_dir).verify()
    # The key made, then the restore; the backup's own entry comes after its snapshot.
    assert verification.ok and verification.entries == 2
    with sqlite3.connect(settings2.layout.usage_db) as db:
        assert db.execute("SELECT tokens FROM usage").fetchall() == [(42,)]
    assert (settings2.conversations_dir / "u1" / "c1.json").read_text() == '{"messages": []}'
    assert (settings2.training_dir / "files" / "file-1.jsonl").exists()
    assert (settings2.store_root / "tiny" / "header.json").exists()
    assert not (settings2.store_root / "tiny" / "tensors.bin").exists()  # without --with-models
    assert not settings2.layout.logs.exists()
    assert settings2.kek_file.read_bytes() == host.settings.kek_file.read_bytes()
    for path in [settings2.state_dir, *settings2.state_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_with_models_and_a_passphrase(host):
    passphrase = host.tmp / "passphrase"
    passphrase.write_text("a long passphrase\n")
    dest = host.tmp / "full.appliance"
    rc, _, err = host("backup", "--with-models", "--passphrase-file", str(passphrase), str(dest))
    assert rc == 0, err
    config2 = _config(host.tmp / "config2.yaml", host.tmp / "restored")
    rc, _, err = host(
        "restore", str(dest), "--passphrase-file", str(passphrase), config_file=config2
    )
    assert rc == 0, err
    restored = load_settings(config2).store_root / "tiny" / "tensors.bin"
    assert restored.read_bytes() == (host.settings.store_root / "tiny" / "tensors.bin").read_bytes()


def _fine_tune(settings: ApplianceSettings, tmp: Path) -> TrainingJob:
    """A finished job's result, published as the trainer does: a tiny Llama with a LoRA adapter,
    merged (the base has no `lora: true` entry) into an encrypted store model."""
    base_dir = tmp / "base"
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = LlamaConfig(vocab_size=64, num_attention_heads=2, num_key_value_heads=2, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base_dir)
    job = TrainingJob(
        id=new_job_id(),
        model="base",
        base_dir=str(base_dir),
        output_model="base-ft-test",
        user="alice",
        hyperparameters=Hyperparameters(),
        format="chat",
        train_examples=1,
        eval_examples=1,
    )
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    publish_tuned(settings, job, get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora))
    return job


def _loaded(settings: ApplianceSettings, model_id: str) -> dict[str, torch.Tensor]:
    """The stored model's tensors, opened as an instance would (key, policy, integrity)."""
    return load_to_host(load_spec(settings, model_id).open(host="hf-" + "ab" * 12))[1]


def _backed_up_and_restored(host) -> ApplianceSettings:
    """A default backup of the host's state, restored into a fresh state directory: its
    settings."""
    dest = host.tmp / "backup.appliance"
    rc, _, err = host("backup", str(dest))
    assert rc == 0, err
    config2 = _config(host.tmp / "config2.yaml", host.tmp / "restored")
    rc, _, err = host(
        "restore", str(dest), "--key-file", str(host.settings.kek_file), config_file=config2
    )
    assert rc == 0, err
    return load_settings(config2)


def test_a_default_backup_keeps_fine_tuned_weights(host):
    # A fine-tuned model exists only in the store; a base model (`tiny`) can be imported again.
    job = _fine_tune(host.settings, host.tmp)
    assert load_catalog(host.settings).get(job.output_model).training_job == job.id
    settings2 = _backed_up_and_restored(host)
    assert not (settings2.store_root / "tiny" / "tensors.bin").exists()
    restored = _loaded(settings2, job.output_model)
    original = _loaded(host.settings, job.output_model)
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[name], original[name]) for name in original)


def test_a_catalog_that_does_not_read_keeps_every_models_weights(host):
    # Which models were fine-tuned is unknown then: none is left out.
    host.settings.user_catalog_file.write_text("models: [{name: broken}]\n")
    assert (_backed_up_and_restored(host).store_root / "tiny" / "tensors.bin").exists()


def test_restore_refuses_a_state_directory_that_is_not_empty(host):
    dest = host.tmp / "backup.appliance"
    assert host("backup", str(dest))[0] == 0
    before = _tree(host.settings.state_dir)
    rc, _, err = host("restore", str(dest))
    assert rc != 0 and "not empty" in err and "Traceback" not in err
    assert _tree(host.settings.state_dir) == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "passphrase"])
def test_a_damaged_backup_or_wrong_passphrase_writes_nothing(host, damage):
    passphrase = host.tmp / "passphrase"
    passphrase.write_text("right one")
    dest = host.tmp / "backup.appliance"
    assert host("backup", "--passphrase-file", str(passphrase), str(dest))[0] == 0
    blob = dest.read_bytes()
    if damage == "flip":
        spot = len(blob) // 2
        dest.write_bytes(blob[:spot] + bytes([blob[spot] ^ 0x80]) + blob[spot + 1 :])
    elif damage == "truncate":
        dest.write_bytes(blob[: len(blob) - 100])
    else:
        passphrase.write_text("wrong one")
    config2 = _config(host.tmp / "config2.yaml", host.tmp / "restored")
    for args in (["backup", "verify"], ["restore"]):
        rc, out, err = host(
            *args, str(dest), "--passphrase-file", str(passphrase), config_file=config2
        )
        expected = "wrong passphrase" if damage == "passphrase" else "altered|cut short"
        assert rc != 0 and out == "", err
        assert err.startswith("error: ") and "Traceback" not in err
        assert re.search(expected, err), err
    assert not (host.tmp / "restored").exists()
    assert sorted(os.listdir(host.tmp)) == sorted(
        ["backup.appliance", "config.yaml", "config2.yaml", "passphrase", "state"]
    )


def test_an_existing_destination_is_not_overwritten(host):
    dest = host.tmp / "backup.appliance"
    dest.write_text("an older backup")
    rc, _, err = host("backup", str(dest))
    assert rc != 0 and "already exists" in err
    assert dest.read_text() == "an older backup"
