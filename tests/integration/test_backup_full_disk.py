"""`appliance backup` onto a full disk and `appliance restore` into one (1 MiB tmpfs mounts):
each fails with one clear line, leaves no partial file behind and changes nothing of the state
it read; the same backup then goes to a roomy disk and verifies."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from appliance.security.api_keys import ApiKeyStore
from appliance.security.audit import AuditLog
from appliance.security.keys import generate_key_file

from appliance.config import ApplianceSettings
from appliance_dev.stack import run_cli, write_config
from tests.tmpfs import tiny_tmpfs


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def state(tmp_path) -> tuple[ApplianceSettings, Path]:
    """A state directory with a key, an audit chain, a key-encryption key and 3 MiB of
    fine-tuning data (more than the full disks hold); and its configuration file."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    settings = ApplianceSettings(state_dir=tmp_path / "state")
    ApiKeyStore(settings.api_keys_file).create("alice")
    AuditLog(settings.audit_dir).append("root", "user_add", "alice")
    generate_key_file(settings.kek_file)
    settings.training_dir.mkdir(parents=True)
    (settings.training_dir / "data.jsonl").write_bytes(os.urandom(3 * 1024 * 1024))
    return settings, write_config(settings, tmp_path / "config.yaml")


def test_a_backup_onto_a_full_disk_says_so_and_leaves_nothing(state, tmp_path):
    settings, config = state
    before = digests(settings.state_dir)
    with tiny_tmpfs(tmp_path / "full") as full:
        made = run_cli(config, "backup", str(full / "state.backup"))
        assert made.returncode == 2, made.stdout + made.stderr
        assert "No space left on device" in made.stderr, made.stderr
        assert "Traceback" not in made.stderr, made.stderr
        assert os.listdir(full) == []  # no partial backup left to fill the disk
    assert digests(settings.state_dir) == before
    roomy = tmp_path / "state.backup"
    assert run_cli(config, "backup", str(roomy)).returncode == 0
    checked = run_cli(config, "backup", "verify", str(roomy))
    assert checked.returncode == 0, checked.stderr


def test_a_restore_into_a_full_disk_says_so_and_restores_nothing(state, tmp_path):
    settings, config = state
    backup = tmp_path / "state.backup"
    made = run_cli(config, "backup", str(backup))
    assert made.returncode == 0, made.stderr
    kek = tmp_path / "kek.key"
    kek.write_bytes(settings.kek_file.read_bytes())
    kek.chmod(0o600)
    with tiny_tmpfs(tmp_path / "full") as full:
        target = ApplianceSettings(state_dir=full / "state")
        target_config = write_config(target, tmp_path / "target.yaml")
        done = run_cli(target_config, "restore", str(backup), "--key-file", str(kek))
        assert done.returncode == 2, done.stdout + done.stderr
        assert "nothing restored" in done.stderr and "No space left" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert not (full / "state").exists() or not any((full / "state").rglob("*"))
