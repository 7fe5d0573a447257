"""An instance's model files sit at the same path on every start (vLLM's compile cache is keyed
by it), one slot per running instance, in a folder only this account may use."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from appliance.store.vllm_plugin import ModelFiles


def fake_model(model_id: str = "m"):
    files = {"config.json": b"{}", "tokenizer.json": b"[]"}
    return SimpleNamespace(model_id=model_id, index=SimpleNamespace(files=files))


def test_the_path_is_stable_and_running_instances_get_their_own(tmp_path):
    base = tmp_path / "base"
    first = ModelFiles.claim(fake_model(), base)
    second = ModelFiles.claim(fake_model(), base)
    assert first.path != second.path
    assert (first.path / "config.json").read_bytes() == b"{}"
    first.release()
    assert not first.path.exists()
    again = ModelFiles.claim(fake_model(), base)
    assert again.path == first.path  # the next start reuses the freed slot: same path
    again.release()
    second.release()


def test_leftovers_of_a_killed_instance_are_replaced(tmp_path):
    base = tmp_path / "base"
    files = ModelFiles.claim(fake_model(), base)
    (files.path / "stale").write_text("x")
    files._lock_fd, fd = -1, files._lock_fd  # as if the process died: its lock goes with it
    os.close(fd)
    fresh = ModelFiles.claim(fake_model(), base)
    assert fresh.path == files.path and not (fresh.path / "stale").exists()
    fresh.release()


def test_a_folder_others_can_enter_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    with pytest.raises(PermissionError, match="private"):
        ModelFiles.claim(fake_model(), base)


def test_file_names_stay_inside(tmp_path):
    model = fake_model()
    model.index.files = {"../evil": b"x"}
    with pytest.raises(ValueError, match="unexpected file name"):
        ModelFiles.claim(model, tmp_path / "base")
