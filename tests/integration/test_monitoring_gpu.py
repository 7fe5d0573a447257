"""NVML for real on a GPU machine (marker gpu): every GPU is read, its metrics come out under
dcgm-exporter's names, load shows as utilisation, and a reading is cheap."""

from __future__ import annotations

import threading
import time

import pytest
from appliance.monitoring.gpu_metrics import DCGM_FIELDS, gpu_families
from appliance.monitoring.nvml import NvmlReader, NvmlUnavailable
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.gpu


@pytest.fixture
def reader():
    try:
        reader = NvmlReader().open()
    except NvmlUnavailable as exc:
        pytest.skip(f"no NVML here: {exc}")
    try:
        yield reader
    finally:
        reader.close()


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def test_every_gpu_is_read_and_exposed_under_dcgm_names(reader):
    readings = reader.read()
    assert readings
    for r in readings:
        print(r)
        assert r.uuid.startswith("GPU-") and r.memory_total_bytes > 2**30
        assert r.temperature_c > 0 and r.power_w > 0 and r.sm_clock_mhz > 0
        assert r.pcie_link_gen >= 1 and r.pcie_link_width >= 1
        assert r.remap_failed is False, r.faults()
    registry = CollectorRegistry()
    registry.register(_Families(gpu_families(readings, "gpu-host")))
    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    for name, *_ in DCGM_FIELDS:
        assert name in parsed, name
    util = parsed["DCGM_FI_DEV_GPU_UTIL"].samples[0]
    assert util.labels["gpu"] == "0" and util.labels["modelName"] == readings[0].name


def test_load_shows_as_utilisation_and_reading_is_cheap(reader):
    torch = pytest.importorskip("torch")
    stop = threading.Event()

    def burn():
        a = torch.randn(8192, 8192, device="cuda")
        while not stop.is_set():
            a @ a
            torch.cuda.synchronize()

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        time.sleep(2.0)
        busy = max(reader.read()[0].utilization_gpu_pct for _ in range(5))
    finally:
        stop.set()
        worker.join()
    assert busy > 50, busy
    started = time.perf_counter()
    for _ in range(20):
        reader.read()
    per_read_ms = (time.perf_counter() - started) / 20 * 1000
    print(f"NVML reading of {len(reader.read())} GPU(s): {per_read_ms:.2f} ms")
    assert per_read_ms < 100
