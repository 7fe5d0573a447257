"""The mount points read from /proc/self/mountinfo, on lines captured from this machine."""

from pathlib import Path

import pytest
from appliance.security.gocryptfs import KEY_BYTES, EncryptedVolume, VolumeError, mount_points

# Captured with a gocryptfs volume mounted at "/tmp/gc3/a b/p" (the space escaped as \040).
CAPTURED = (
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    "45 27 0:40 / /tmp/gc3/a\\040b/p rw,nosuid,nodev,relatime - fuse.gocryptfs"
    " /tmp/gc3/a\\040b/c rw,user_id=0,group_id=0,max_read=131072\n"
)


def test_mount_points_are_unescaped():
    assert mount_points(CAPTURED) == {Path("/"), Path("/tmp/gc3/a b/p")}


def test_a_non_ascii_mount_point_comes_back_whole():
    line = "46 27 0:41 / /srv/d\\303\\251p\\303\\264t rw - fuse.gocryptfs /x rw\n"
    assert mount_points(line) == {Path("/srv/dépôt")}


def test_a_key_of_the_wrong_size_is_refused(tmp_path):
    volume = EncryptedVolume(tmp_path / "c", tmp_path / "p")
    with pytest.raises(VolumeError, match=f"{KEY_BYTES} bytes"):
        volume.create(b"short")
    assert not (tmp_path / "c").exists()
