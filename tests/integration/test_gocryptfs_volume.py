"""A real gocryptfs volume: what is written through the mount is ciphertext on disk, a wrong key
opens nothing, a second mount is no stacked mount, and destroy leaves nothing."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from appliance.security.gocryptfs import (
    EncryptedVolume,
    VolumeError,
    WrongVolumeKey,
    mount_points,
)

SENTENCE = b"the heron counts seventeen silver keys at dawn"


@pytest.fixture
def volume(tmp_path):
    made = EncryptedVolume(tmp_path / "cipher", tmp_path / "plain")
    yield made
    made.unmount()


def _mounts_at(path: Path) -> int:
    text = Path("/proc/self/mountinfo").read_text()
    return sum(1 for line in text.splitlines() if mount_points(line) == {path.resolve()})


def test_written_text_is_ciphertext_on_disk(volume):
    key = secrets.token_bytes(32)
    volume.create(key)
    volume.mount(key)
    assert volume.mounted()
    (volume.mount_dir / "notes").mkdir()
    (volume.mount_dir / "notes" / "secret.txt").write_bytes(SENTENCE * 100)
    for root, _, files in os.walk(volume.cipher_dir):
        for name in files:
            data = Path(root, name).read_bytes()
            assert b"heron" not in data and b"secret" not in name.encode()

    volume.unmount()
    assert not volume.mounted() and not any(volume.mount_dir.iterdir())
    volume.mount(key)
    assert (volume.mount_dir / "notes" / "secret.txt").read_bytes() == SENTENCE * 100


def test_a_second_mount_is_no_stacked_mount(volume):
    key = secrets.token_bytes(32)
    volume.create(key)
    volume.mount(key)
    volume.mount(key)
    assert _mounts_at(volume.mount_dir) == 1
    volume.unmount()
    assert _mounts_at(volume.mount_dir) == 0


def test_a_wrong_key_opens_nothing(volume):
    volume.create(secrets.token_bytes(32))
    with pytest.raises(WrongVolumeKey, match="not this volume's"):
        volume.mount(secrets.token_bytes(32))
    assert not volume.mounted()


def test_refusals_say_why(volume, tmp_path):
    key = secrets.token_bytes(32)
    with pytest.raises(VolumeError, match="holds no encrypted volume"):
        volume.mount(key)
    volume.create(key)
    with pytest.raises(VolumeError, match="not empty"):
        volume.create(key)
    volume.mount_dir.mkdir()
    (volume.mount_dir / "stray").write_text("x")
    with pytest.raises(VolumeError, match="mount point is not empty"):
        volume.mount(key)


def test_an_open_file_keeps_it_mounted_and_destroy_leaves_nothing(volume):
    key = secrets.token_bytes(32)
    volume.create(key)
    volume.mount(key)
    with open(volume.mount_dir / "open.txt", "w") as held:
        held.write("x")
        with pytest.raises(VolumeError, match="unmount"):
            volume.unmount()
        assert volume.mounted()
    volume.destroy()
    assert not volume.mounted()
    assert not volume.cipher_dir.exists() and not volume.mount_dir.exists()
