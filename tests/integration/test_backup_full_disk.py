"""`appliance backup` onto a full disk and `appliance restore` into one (1 MiB tmpfs mounts):
each fails with one clear line, leaves no partial file behind and changes nothing of the state
it read; the same backup then goes to a roomy disk and verifies."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from appliance.security.api_keys import ApiKeyStore
from appliance.security.audit import AuditLog
from appliance.security.keys import generate_key_file

from appliance.config import ApplianceSettings
from appliance_dev.stack import write_config


@contextlib.contextmanager
def tiny_tmpfs(path: Path):
    """A 1 MiB filesystem at `path`, unmounted on the way out (even when the test fails)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def appliance(config: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


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
        made = appliance(config, "backup", str(full / "state.backup"))
        assert made.returncode == 2, made.stdout + made.stderr
        assert "No space left on device" in made.stderr, made.stderr
        assert "Traceback" not in made.stderr, made.stderr
        assert os.listdir(full) == []  # no partial backup left to fill the disk
    assert digests(settings.state_dir) == before
    roomy = tmp_path / "state.backup"
    assert appliance(config, "backup", str(roomy)).returncode == 0
    checked = appliance(config, "backup", "verify", str(roomy))
    assert checked.returncode == 0, checked.stderr


def test_a_restore_into_a_full_disk_says_so_and_restores_nothing(state, tmp_path):
    settings, config = state
    backup = tmp_path / "state.backup"
    made = appliance(config, "backup", str(backup))
    assert made.returncode == 0, made.stderr
    kek = tmp_path / "kek.key"
    kek.write_bytes(settings.kek_file.read_bytes())
    kek.chmod(0o600)
    with tiny_tmpfs(tmp_path / "full") as full:
        target = ApplianceSettings(state_dir=full / "state")
        target_config = write_config(target, tmp_path / "target.yaml")
        done = appliance(target_config, "restore", str(backup), "--key-file", str(kek))
        assert done.returncode == 2, done.stdout + done.stderr
        assert "nothing restored" in done.stderr and "No space left" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert not (full / "state").exists() or not any((full / "state").rglob("*"))
