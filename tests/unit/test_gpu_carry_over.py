"""Parts carried from an earlier lease's result file: only on the same GPU, with their date."""

from benchmarks.gpu.carry_over import carry_over

H100 = "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04"
COMMITTED = {
    "gpu": H100,
    "details": {
        "throughput": {"tokens_per_s_ratio": 1.025},
        "baseline_vllm_default_runs_s": [79.6],
        "measured_at": {"throughput": "2026-12-07T01:35:00Z"},
    },
}


def test_carries_the_named_parts_with_their_date():
    results: dict = {}
    asked = ["throughput", "baseline_vllm_default_runs_s"]
    assert carry_over(COMMITTED, results, asked, H100) == ["throughput"]
    assert results["throughput"] == {"tokens_per_s_ratio": 1.025}
    assert results["measured_at"] == {"throughput": "2026-12-07T01:35:00Z"}
    assert "baseline_vllm_default_runs_s" not in results  # a ratio's baseline is never carried


def test_nothing_from_another_gpu_or_none():
    for gpu in ("NVIDIA H200, 143771 MiB, 580.159.04", None):
        results: dict = {}
        assert carry_over(COMMITTED, results, ["throughput"], gpu) == []
        assert results == {}


def test_this_lease_measurement_wins():
    results = {"throughput": {"tokens_per_s_ratio": 0.99}}
    assert carry_over(COMMITTED, results, ["throughput"], H100) == []
    assert results["throughput"] == {"tokens_per_s_ratio": 0.99}
