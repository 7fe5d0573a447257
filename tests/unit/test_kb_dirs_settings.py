"""Which knowledge-base directories the settings give, a gateway that cannot start with data
at rest encrypted and no key-encryption key, saying why, and plain directories looked up once
while open."""

from __future__ import annotations

import pytest
from appliance.rag.kb_dirs import EncryptedKnowledgeBaseDirs, KnowledgeBaseDirs, knowledge_base_dirs
from appliance.security.keys import KeySetupError, generate_key_file

from appliance.config import load_settings
from appliance.gateway.knowledge import KnowledgeService
from appliance.store.keyring import data_at_rest_kek


def _settings(tmp_path, enabled: bool):
    return load_settings(
        state_dir=str(tmp_path / "state"), security={"data_at_rest": {"enabled": enabled}}
    )


def test_plain_directories_unless_data_at_rest_is_encrypted(tmp_path):
    plain = _settings(tmp_path, False)
    dirs = knowledge_base_dirs(plain, data_at_rest_kek(plain))
    assert type(dirs) is KnowledgeBaseDirs and dirs.root == plain.rag_dir / "kbs"

    encrypted = _settings(tmp_path, True)
    encrypted.kek_file.parent.mkdir(parents=True, mode=0o700)
    generate_key_file(encrypted.kek_file)
    dirs = knowledge_base_dirs(encrypted, data_at_rest_kek(encrypted))
    assert isinstance(dirs, EncryptedKnowledgeBaseDirs)
    assert dirs.volumes == encrypted.state_dir / "kb-volumes"
    # Mounted outside the rag folder, which is inside the data volume: no FUSE mount in another.
    assert dirs.path("kb1") == encrypted.state_dir / "kb-mounts" / "kb1"
    for path in (dirs.volumes, dirs.mounts):
        assert not path.is_relative_to(encrypted.rag_dir)
        assert not path.is_relative_to(encrypted.layout.data)


def test_the_gateway_refuses_to_start_without_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("APPLIANCE_STORE_PASSPHRASE", raising=False)
    settings = _settings(tmp_path, True)
    with pytest.raises(KeySetupError, match=r"data_at_rest.enabled is on, but no key-encryption"):
        KnowledgeService(settings)
    KnowledgeService(_settings(tmp_path, False))  # off: no key needed


def test_a_plain_directory_is_looked_up_once_while_open(tmp_path):
    dirs = KnowledgeBaseDirs(tmp_path)
    assert dirs.open("kb-abc", create=False) is None
    path = dirs.open("kb-abc", create=True)
    assert path == tmp_path / "kbs" / "kb-abc" and path.is_dir()
    # Open: known to be there, not made or looked up again (a round trip each through FUSE).
    path.rmdir()
    assert dirs.open("kb-abc", create=False) == path and not path.exists()
    dirs.close("kb-abc")
    assert dirs.open("kb-abc", create=False) is None
    assert dirs.open("kb-abc", create=True) == path
    dirs.destroy("kb-abc")
    assert not path.exists() and dirs.open("kb-abc", create=False) is None
    dirs.open("kb-abc", create=True)
    dirs.close_all()
    path.rmdir()
    assert dirs.open("kb-abc", create=False) is None
