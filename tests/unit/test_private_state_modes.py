"""The state directory made private to its owner (0700 folders, 0600 files) without touching
the local cluster's files or what links point to, and the stack's detached processes creating
only private files."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

from appliance.daemon import start_detached, stop_pid
from appliance.layout import StateLayout


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_an_old_state_dir_is_tightened_and_stays_so(tmp_path):
    layout = StateLayout(tmp_path / "state")
    chroma = layout.rag / "chroma" / "chroma.sqlite3"
    log = layout.logs / "gateway.log"
    endpoint = layout.instances / "12.json"
    tool = layout.service_home / "bin" / "tool"
    slurm_conf = layout.slurm.slurm_conf
    for path in (chroma, log, endpoint, tool, slurm_conf, layout.rag / "registry.sqlite3"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("secret")
        path.chmod(0o644)
    tool.chmod(0o755)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours to change")
    outside.chmod(0o644)
    (layout.logs / "link").symlink_to(outside)
    for path in tmp_path.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    layout.root.chmod(0o755)
    moved_rag = tmp_path / "kb-elsewhere"
    (moved_rag / "chroma").mkdir(parents=True)
    (moved_rag / "chroma" / "chroma.sqlite3").write_text("secret")
    (moved_rag / "chroma" / "chroma.sqlite3").chmod(0o644)

    layout.make_private(moved_rag, layout.rag)

    assert mode(layout.root) == 0o700
    for directory in (layout.rag, chroma.parent, layout.logs, layout.instances):
        assert mode(directory) == 0o700, directory
    for file in (chroma, log, endpoint, layout.rag / "registry.sqlite3"):
        assert mode(file) == 0o600, file
    assert mode(tool) == 0o700  # still executable by its owner
    assert mode(moved_rag) == 0o700 and mode(moved_rag / "chroma" / "chroma.sqlite3") == 0o600
    # Slurm's own files keep their modes (the tools read slurm.conf); the state dir shuts
    # others out of them. What a link points to is not the state's.
    assert mode(slurm_conf) == 0o644 and mode(layout.slurm.root) == 0o755
    assert mode(outside) == 0o644

    changed = os.stat(chroma).st_ctime_ns
    layout.make_private(moved_rag)
    assert os.stat(chroma).st_ctime_ns == changed  # nothing to do the second time


def test_a_missing_state_dir_is_made_private(tmp_path):
    layout = StateLayout(tmp_path / "new" / "state")
    layout.make_private()
    assert mode(layout.root) == 0o700


def test_detached_processes_write_private_files(tmp_path):
    log = tmp_path / "logs" / "service.log"
    log.parent.mkdir()
    log.write_text("from an older version\n")
    log.chmod(0o644)
    pidfile = tmp_path / "service.pid"
    made = tmp_path / "made-by-the-service"
    code = f"open({str(made)!r}, 'w').write('x'); import time; time.sleep(60)"
    start_detached([sys.executable, "-c", code], log, pidfile)
    try:
        deadline = time.monotonic() + 30
        while not made.exists():
            assert time.monotonic() < deadline, "the service never wrote its file"
            time.sleep(0.05)
        assert mode(made) == 0o600
        assert mode(log) == 0o600 and mode(pidfile) == 0o600
    finally:
        stop_pid(pidfile, timeout=5)
