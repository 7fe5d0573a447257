"""The knowledge bases' write lock: writes run side by side, a snapshot waits for them and holds
new ones back."""

from __future__ import annotations

import threading
import time

from appliance.rag.write_lock import write_lock


def test_writes_share_the_lock_and_a_snapshot_excludes_them(tmp_path):
    events: list[str] = []
    with write_lock(tmp_path), write_lock(tmp_path):  # two writes at once
        snapshot = threading.Thread(target=lambda: _hold(tmp_path, events, "snapshot"))
        snapshot.start()
        time.sleep(0.2)
        events.append("writes done")
    snapshot.join(timeout=10)
    assert events == ["writes done", "snapshot"]

    with write_lock(tmp_path, exclusive=True):
        write = threading.Thread(target=lambda: _hold(tmp_path, events, "write", shared=True))
        write.start()
        time.sleep(0.2)
        events.append("snapshot done")
    write.join(timeout=10)
    assert events[2:] == ["snapshot done", "write"]


def _hold(root, events, name, shared=False):
    with write_lock(root, exclusive=not shared):
        events.append(name)
