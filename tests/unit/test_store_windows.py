"""Window planning of the streaming GPU load: every tensor in exactly one window, windows of
whole chunks, no window larger than asked unless one tensor is."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from appliance.store.format import TensorEntry
from appliance.store.loader import plan_windows

CHUNK = 4096


def fake_model(sizes: list[int], gap: int = 0):
    tensors, offset = [], 0
    for i, n in enumerate(sizes):
        tensors.append(TensorEntry(f"t{i}", "U8", (n,), offset, n))
        offset += n + gap
    # Out of file order on purpose: the plan sorts by offset.
    tensors.reverse()
    return SimpleNamespace(
        header=SimpleNamespace(chunk_bytes=CHUNK), index=SimpleNamespace(tensors=tensors)
    )


@pytest.mark.parametrize(
    "sizes, window",
    [
        ([100] * 50, CHUNK),
        ([5000, 3, 7, 9000, 1, 40000, 2, 2], 3 * CHUNK),
        ([CHUNK] * 10, 2 * CHUNK),
        ([1], CHUNK),
        ([70_000, 10, 10, 10], 2 * CHUNK),
    ],
)
def test_windows_cover_every_tensor_once_in_whole_chunks(sizes, window):
    model = fake_model(sizes, gap=13)
    windows = plan_windows(model, window)
    names = [e.name for w in windows for e in w.tensors]
    assert sorted(names) == sorted(e.name for e in model.index.tensors)
    assert len(names) == len(set(names))
    for w in windows:
        assert w.tensors
        for e in w.tensors:
            assert w.first * CHUNK <= e.offset
            assert e.offset + e.nbytes <= w.end * CHUNK
        span = (w.end - w.first) * CHUNK
        largest = max(-(-(e.offset % CHUNK + e.nbytes) // CHUNK) * CHUNK for e in w.tensors)
        assert span <= max(window, largest)
    # In file order, so a chunk two windows share is read at most twice.
    firsts = [w.first for w in windows]
    assert firsts == sorted(firsts)
    for a, b in itertools.pairwise(windows):
        assert b.first >= a.end - 1


def test_a_tensor_larger_than_the_window_gets_one_of_its_own():
    windows = plan_windows(fake_model([100, 10 * CHUNK, 100]), 2 * CHUNK)
    assert [[e.name for e in w.tensors] for w in windows] == [["t0"], ["t1"], ["t2"]]
