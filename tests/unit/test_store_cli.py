"""`appliance store` and `appliance models import`: keys, import, policies, rotation, errors."""

from __future__ import annotations

import json

import pytest

from appliance.cli.main import main
from appliance.config import load_settings
from appliance.store.keyring import load_spec
from tests.unit.test_store import make_checkpoint

FOREIGN_HOST = "hf-" + "1" * 24


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run the CLI against a config whose state lives in tmp_path; returns (rc, stdout, stderr)."""
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    monkeypatch.delenv("APPLIANCE_STORE_PASSPHRASE", raising=False)

    def run(*args: str):
        rc = main(["--config", str(config), *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    run.settings = load_settings(config)
    return run


def test_import_serves_policy_rotate(tmp_path, cli):
    make_checkpoint(tmp_path / "ckpt")
    rc, out, err = cli("models", "import", str(tmp_path / "ckpt"), "--name", "m")
    assert rc == 0, err
    assert "key-encryption key" in out and "imported m (encrypted, verified)" in out
    settings = cli.settings
    assert (settings.kek_file.stat().st_mode & 0o777) == 0o600
    # The catalog points at the store, and an instance's spec opens it with its policy.
    rc, out, _ = cli("models", "list")
    assert "m " in out and "yes" in out
    spec = load_spec(settings, "m")
    assert spec.open(host="hf-anything").model_id == "m"
    # A new policy for another host only: this host is refused, with the rule.
    rc, out, err = cli("store", "policy", "m", "--host", FOREIGN_HOST, "--expires", "2099-01-01")
    assert rc == 0, err
    with pytest.raises(Exception, match="rule 'host'"):
        spec.open(host="hf-" + "2" * 24)
    spec.open(host=FOREIGN_HOST)
    # Rotation: rewrap under a new key file, then only that key opens the model.
    new_key = tmp_path / "new.key"
    from appliance.security.keys import generate_key_file

    generate_key_file(new_key)
    rc, out, err = cli("store", "rotate-key", str(new_key))
    assert rc == 0 and "rewrapped 1 models" in out, err
    with pytest.raises(Exception, match="wrapped by key"):
        spec.open(host=FOREIGN_HOST)
    spec.key_file = str(new_key)
    spec.open(host=FOREIGN_HOST)
    rc, out, _ = cli("store", "list")
    header = json.loads((settings.store_root / "m" / "header.json").read_text())
    assert header["key_wrap"]["kek_id"] in out


def test_import_errors_are_one_clear_line(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = cli("models", "import", "no-such-org/no-such-model")
    assert rc == 2 and "cannot download no-such-org/no-such-model" in err
    assert "Traceback" not in err
    rc, _, err = cli("models", "import", str(tmp_path / "missing"))
    assert rc == 2 and "neither a directory nor a Hugging Face hub id" in err
    make_checkpoint(tmp_path / "ckpt")
    assert cli("models", "import", str(tmp_path / "ckpt"), "--name", "m")[0] == 0
    rc, _, err = cli("models", "import", str(tmp_path / "ckpt"), "--name", "m")
    assert rc == 2 and "already in the store" in err
    rc, _, err = cli("models", "import", str(tmp_path / "ckpt"), "--name", "x", "--expires", "soon")
    assert rc == 2 and "not an ISO date" in err


def test_passphrase_instead_of_key_file(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("APPLIANCE_STORE_PASSPHRASE", "correct horse battery staple")
    make_checkpoint(tmp_path / "ckpt")
    rc, _out, err = cli("models", "import", str(tmp_path / "ckpt"), "--name", "p")
    assert rc == 0, err
    settings = cli.settings
    assert not settings.kek_file.exists() and (settings.store_root / "kdf.json").exists()
    spec = load_spec(settings, "p")
    spec.open(host="hf-any")
    monkeypatch.setenv("APPLIANCE_STORE_PASSPHRASE", "wrong horse")
    with pytest.raises(Exception, match="wrapped by key"):
        spec.open(host="hf-any")
