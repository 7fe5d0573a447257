"""Atomic file replacement and lenient JSON reading, shared by the stack and the installer."""

from __future__ import annotations

from appliance.atomic_files import read_json_object, write_if_changed, write_json, write_text


def test_a_rewrite_with_the_same_text_and_mode_changes_nothing(tmp_path):
    path = tmp_path / "etc" / "slurm.conf"
    assert write_if_changed(path, "a\n", 0o644)
    before = path.stat().st_mtime_ns
    assert not write_if_changed(path, "a\n", 0o644)
    assert path.stat().st_mtime_ns == before
    assert write_if_changed(path, "a\n", 0o755) and path.stat().st_mode & 0o777 == 0o755
    assert write_if_changed(path, "b\n") and path.read_text() == "b\n"
    assert [p.name for p in path.parent.iterdir()] == ["slurm.conf"]  # no temporary left


def test_json_that_is_missing_garbled_or_not_an_object_reads_as_none(tmp_path):
    path = tmp_path / "progress.json"
    assert read_json_object(path) is None
    write_text(path, '{"step": ')
    assert read_json_object(path) is None
    write_json(path, [1, 2])
    assert read_json_object(path) is None
    write_json(path, {"step": 3})
    assert read_json_object(path) == {"step": 3}
