"""The NVML reader against answers captured on a real H200 (tests/unit/testdata/nvml), and the
same answers changed to show faults: a failed row remap, an XID error, throttling, a narrow PCIe
link, unsupported queries."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from appliance.monitoring.gpu_metrics import DCGM_FIELDS, gpu_families
from appliance.monitoring.nvml import NvmlReader, NvmlUnavailable
from appliance.monitoring.nvml_replay import ReplayNvml
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

CAPTURES = Path(__file__).parent / "testdata" / "nvml"
CAPTURE = CAPTURES / "h200.json"
NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED
TIMEOUT = 10  # NVML_ERROR_TIMEOUT


@pytest.fixture
def capture() -> dict:
    return json.loads(CAPTURE.read_text())


def read(calls: dict):
    reader = NvmlReader(ReplayNvml(calls)).open()
    try:
        return reader.read()
    finally:
        reader.close()


@pytest.mark.parametrize("name", ["h100.json", "h200.json"])
def test_every_capture_replays_as_it_read_on_its_gpu(name):
    capture = json.loads((CAPTURES / name).read_text())
    assert [asdict(r) for r in read(capture["calls"])] == capture["readings"]


def test_replayed_capture_reads_as_it_did_on_the_gpu(capture):
    readings = read(capture["calls"])
    assert [asdict(r) for r in readings] == capture["readings"]
    gpu = readings[0]
    assert gpu.name == "NVIDIA H200" and gpu.memory_total_bytes > 140 * 10**9
    assert gpu.throttle_names == ["gpu_idle"] and gpu.faults() == []


def test_faults_are_named(capture):
    calls = copy.deepcopy(capture["calls"])
    calls["nvmlDeviceGetRemappedRows(h0)"] = [0, 2, 0, 1]
    calls["nvmlDeviceGetCurrentClocksEventReasons(h0)"] = 0x40
    calls["nvmlDeviceGetCurrPcieLinkWidth(h0)"] = 8
    event = {"device": {"uuid": capture["readings"][0]["uuid"]}, "eventData": 79, "eventType": 8}
    calls["nvmlEventSetWait_v2(events,0)"] = {"__sequence__": [event, {"__nvml_error__": TIMEOUT}]}
    gpu = read(calls)[0]
    assert gpu.xid_events == [79]
    assert gpu.faults() == [
        "row remapping failed: the GPU needs service",
        "XID errors 79",
        "throttled: hw_thermal_slowdown",
        "PCIe link x8 of x16",
    ]
    families = {f.name: f for f in gpu_families([gpu], "n1")}
    assert families["DCGM_FI_DEV_XID_ERRORS"].samples[0].value == 79
    assert families["appliance_gpu_healthy"].samples[0].value == 0


def test_an_unsupported_query_leaves_the_others(capture):
    calls = copy.deepcopy(capture["calls"])
    calls["nvmlDeviceGetPowerUsage(h0)"] = {"__nvml_error__": NOT_SUPPORTED}
    del calls["nvmlDeviceGetRemappedRows(h0)"]  # never answered: also "not supported"
    gpu = read(calls)[0]
    assert gpu.power_w is None and gpu.remap_failed is None
    assert set(gpu.unsupported) == {"power", "remapped_rows"}
    assert gpu.temperature_c == capture["readings"][0]["temperature_c"]
    names = {f.name for f in gpu_families([gpu], "n1") if f.samples}
    assert "DCGM_FI_DEV_POWER_USAGE" not in names and "DCGM_FI_DEV_GPU_TEMP" in names


def test_no_driver_is_reported_not_raised():
    class NoDriver:
        class NVMLError(Exception):
            pass

        def nvmlInit(self):
            raise self.NVMLError("Driver Not Loaded")

    with pytest.raises(NvmlUnavailable, match="Driver Not Loaded"):
        NvmlReader(NoDriver()).open()


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def test_exposition_parses_with_dcgm_names_and_labels(capture):
    registry = CollectorRegistry()
    registry.register(_Families(gpu_families(read(capture["calls"]), "gpu-host")))
    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {name for name, *_ in DCGM_FIELDS} <= set(parsed)
    sample = parsed["DCGM_FI_DEV_FB_USED"].samples[0]
    assert sample.labels == {
        "gpu": "0",
        "UUID": capture["readings"][0]["uuid"],
        "device": "nvidia0",
        "modelName": "NVIDIA H200",
        "pci_bus_id": "00000000:00:06.0",
        "Hostname": "gpu-host",
    }
    assert sample.value == pytest.approx(capture["readings"][0]["memory_used_bytes"] / 2**20)
