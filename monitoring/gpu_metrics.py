"""GPU readings as Prometheus metrics under dcgm-exporter's names (DCGM_FI_*) and labels, so
dashboards made for dcgm-exporter work unchanged; `appliance_gpu_*` for what DCGM lacks."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.monitoring.nvml import GpuReading
from prometheus_client.core import GaugeMetricFamily, Metric

LABELS = ["gpu", "UUID", "device", "modelName", "pci_bus_id", "Hostname"]
MIB = 1024 * 1024

# name, help, value of a reading (None: not reported for that GPU). DCGM's units (MiB, MHz, W).
DCGM_FIELDS = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (%).", lambda r: r.utilization_gpu_pct),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (%).", lambda r: r.utilization_memory_pct),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (MiB).",
        lambda r: None if r.memory_used_bytes is None else r.memory_used_bytes / MIB,
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (MiB).",
        lambda r: None if r.memory_free_bytes is None else r.memory_free_bytes / MIB,
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (C).", lambda r: r.temperature_c),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (W).", lambda r: r.power_w),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (MHz).", lambda r: r.sm_clock_mhz),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (MHz).", lambda r: r.memory_clock_mhz),
    (
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "Throttle reasons (bitmask).",
        lambda r: r.throttle_reasons,
    ),
    (
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "Single-bit volatile ECC errors.",
        lambda r: r.ecc_corrected_volatile,
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "Double-bit volatile ECC errors.",
        lambda r: r.ecc_uncorrected_volatile,
    ),
    (
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "Rows remapped for correctable errors.",
        lambda r: r.remapped_rows_correctable,
    ),
    (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Rows remapped for uncorrectable errors.",
        lambda r: r.remapped_rows_uncorrectable,
    ),
    (
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "Whether remapping of rows has failed.",
        lambda r: None if r.remap_failed is None else int(r.remap_failed),
    ),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "PCIe replay counter.", lambda r: r.pcie_replay_counter),
    ("DCGM_FI_DEV_PCIE_LINK_GEN", "PCIe link generation.", lambda r: r.pcie_link_gen),
    ("DCGM_FI_DEV_PCIE_LINK_WIDTH", "PCIe link width (lanes).", lambda r: r.pcie_link_width),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error seen.",
        lambda r: r.xid_events[-1] if r.xid_events else 0,
    ),
]

APPLIANCE_FIELDS = [
    ("appliance_gpu_memory_total_bytes", "GPU memory in total.", lambda r: r.memory_total_bytes),
    ("appliance_gpu_power_limit_watts", "Enforced power limit.", lambda r: r.power_limit_w),
    (
        "appliance_gpu_pcie_link_gen_max",
        "Highest PCIe generation of the link.",
        lambda r: r.pcie_link_gen_max,
    ),
    (
        "appliance_gpu_pcie_link_width_max",
        "Widest PCIe link (lanes).",
        lambda r: r.pcie_link_width_max,
    ),
    (
        "appliance_gpu_row_remap_pending",
        "A row remap waits for a GPU reset.",
        lambda r: None if r.remap_pending is None else int(r.remap_pending),
    ),
    (
        "appliance_gpu_healthy",
        "1 when no fault is seen on the GPU.",
        lambda r: 0 if r.faults() else 1,
    ),
]


def gpu_families(readings: Iterable[GpuReading], hostname: str) -> list[Metric]:
    readings = list(readings)
    families = []
    for name, doc, value_of in DCGM_FIELDS + APPLIANCE_FIELDS:
        family = GaugeMetricFamily(name, doc, labels=LABELS)
        for r in readings:
            value = value_of(r)
            if value is not None:
                labels = [str(r.index), r.uuid, f"nvidia{r.index}", r.name, r.pci_bus_id, hostname]
                family.add_metric(labels, float(value))
        families.append(family)
    return families
