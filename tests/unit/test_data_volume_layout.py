"""Where the user content lives with security.data_at_rest on and off, what the service account
is handed, and how a state not sealed yet is read (no volume mounted: paths and settings only)."""

from __future__ import annotations

from appliance.security.data_volume import as_found, still_plaintext
from appliance.security.privileges import service_dirs

from appliance.cli.data import describe
from appliance.config import load_settings
from appliance.layout import StateLayout


def _settings(tmp_path, enabled: bool):
    return load_settings(state_dir=str(tmp_path), security={"data_at_rest": {"enabled": enabled}})


def test_user_content_moves_into_the_mount_point_only_when_encrypted(tmp_path):
    plain, encrypted = StateLayout(tmp_path), StateLayout(tmp_path, encrypted=True)
    for name in ("rag", "conversations", "training", "webapp"):
        assert getattr(plain, name) == tmp_path / name
        assert getattr(encrypted, name) == tmp_path / "data" / name
    # What is not user content stays where it was; the knowledge bases' own volumes' ciphertext
    # and mount points stay outside the data volume.
    assert encrypted.keys == plain.keys and encrypted.audit == plain.audit
    assert not encrypted.kb_volumes.is_relative_to(encrypted.data)
    assert not encrypted.kb_mounts.is_relative_to(encrypted.data)
    assert encrypted.tmp.is_relative_to(encrypted.data)


def test_the_service_account_is_handed_the_volume_not_its_inside(tmp_path):
    dirs = service_dirs(_settings(tmp_path, True))
    assert tmp_path / "vault" in dirs and tmp_path / "data" in dirs
    assert tmp_path / "kb-volumes" in dirs and tmp_path / "kb-mounts" in dirs
    assert not any(d.is_relative_to(tmp_path / "data") and d != tmp_path / "data" for d in dirs)
    assert tmp_path / "rag" in service_dirs(_settings(tmp_path, False))


def test_a_state_not_sealed_yet_is_read_where_its_content_lies(tmp_path):
    settings = _settings(tmp_path, True)
    assert not still_plaintext(settings) and as_found(settings) is settings
    (tmp_path / "conversations").mkdir()
    assert still_plaintext(settings)
    found = as_found(settings)
    assert found.conversations_dir == tmp_path / "conversations"
    assert settings.conversations_dir == tmp_path / "data" / "conversations"


def test_status_says_when_user_data_is_not_encrypted(tmp_path):
    assert "NOT encrypted at rest" in describe(_settings(tmp_path, False))
    assert "no data volume yet" in describe(_settings(tmp_path, True))
