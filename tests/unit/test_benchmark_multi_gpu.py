"""benchmarks/multi_gpu.py without a GPU: which models a machine runs, and each rank's load read
from the store plugin's log line."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import multi_gpu

# As the store's plugin logs a tensor-parallel rank's load on a GPU (load_stored_weights).
RANK_LINES = """\
(Worker_TP1 pid=2) INFO [vllm_plugin.py:251] appliance-store: loaded m-tp4 from the host tier \
(723 tensors, 141.11 GB) in 4.02 s; load_peak_gpu_bytes_over_model=0.261; \
load_peak_gpu_bytes_over_shard=1.042; tensor-parallel rank 1 of 4 read 61.20 GB (0.434 of the model)
(Worker_TP0 pid=1) INFO [vllm_plugin.py:251] appliance-store: loaded m-tp4 from the store \
(723 tensors, 141.11 GB) in 5.10 s; load_peak_gpu_bytes_over_model=0.262; \
load_peak_gpu_bytes_over_shard=1.051; tensor-parallel rank 0 of 4 read 62.05 GB (0.440 of the model)
"""


@pytest.mark.parametrize(
    ("gpus", "tp", "preset"),
    [
        (8, 4, "llama-3.3-70b-instruct"),
        (4, 4, "llama-3.3-70b-instruct"),
        (3, 2, "qwen2.5-14b-instruct"),
        (2, 2, "qwen2.5-14b-instruct"),
    ],
)
def test_the_gpus_there_are_choose_the_tensor_parallel_preset(monkeypatch, gpus, tp, preset):
    monkeypatch.setattr(multi_gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(multi_gpu, "cuda_gpus", lambda: gpus)
    plan = multi_gpu.plan_of(argparse.Namespace(gpus=0, tp_preset=None))
    assert (plan.gpus, plan.tp, plan.tp_preset) == (gpus, tp, preset)
    assert plan.tp_model == f"{preset}-tp{tp}" and plan.pool_model == "llama-3.1-8b-instruct"


def test_a_cpu_runs_test_shapes_on_simulated_gpus(monkeypatch):
    monkeypatch.setattr(multi_gpu, "cuda_available", lambda: False)
    plan = multi_gpu.plan_of(argparse.Namespace(gpus=2, tp_preset=None))
    assert plan == multi_gpu.Plan(2, False, 2, "test-shaped", "test-shaped")
    assert plan.tp_model != plan.pool_model  # two store entries of one shape


def test_each_ranks_load_is_read_from_its_log_line():
    ranks = multi_gpu.rank_loads(RANK_LINES)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0] == {
        "rank": 0,
        "load_s": 5.10,
        "read_gb": 62.05,
        "read_fraction": 0.440,
        "load_GBps": 12.17,
        "load_peak_gpu_bytes_over_shard": 1.051,
    }
    # One GPU's line has no rank part: no rank load.
    assert multi_gpu.rank_loads("appliance-store: loaded m from the store (1 tensors, 1 GB)") == []
