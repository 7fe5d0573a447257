"""A load that streams through one reused window (stream_to_gpu on a GPU) into a consumer that
keeps tensors until their layer is complete (vLLM's layerwise reload, a kept engine's claim):
without copies the kept tensors show the next window's bytes; `owned` gives each its own."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from appliance.store.vllm_plugin import owned


def through_one_window(
    values: list[float], per_window: int = 2
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one element each, `per_window` at a time in the same buffer (as the store's
    ring hands out views of one device window)."""
    window = torch.empty(per_window)
    for start in range(0, len(values), per_window):
        part = values[start : start + per_window]
        window[: len(part)] = torch.tensor(part)
        for i in range(len(part)):
            yield f"w{start + i}", window[i : i + 1]


def kept_until_the_end(weights: Iterator[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """A consumer that copies nothing until it has every tensor (a layer's worth)."""
    kept = dict(weights)
    return {name: float(t[0]) for name, t in kept.items()}


def test_a_consumer_that_keeps_tensors_sees_the_window_overwritten_without_copies():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    seen = kept_until_the_end(through_one_window(values))
    assert list(seen.values()) != values  # what the reuse would do to a kept engine's claim
    assert list(kept_until_the_end(owned(through_one_window(values))).values()) == values
