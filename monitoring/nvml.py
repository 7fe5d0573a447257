"""GPU readings through NVML (the `nvidia-ml-py` package): utilisation, memory, temperature,
power, clocks, throttle reasons, ECC counts, remapped rows, PCIe link and replays, XID events.

The NVML module is injected (`nvml=`): the real `pynvml` on a GPU machine, or a replay of
captured real answers in tests (monitoring/nvml_replay.py). A value the GPU does not support is
None and the reason is kept in `unsupported`; one failing query never hides the others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

# Throttle ("clocks event") reason bits, named as nvidia-smi names them.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean trouble, not a choice (idle and power caps are normal).
BAD_THROTTLE_MASK = 0x8 | 0x40 | 0x80


class NvmlUnavailable(Exception):
    """NVML cannot be used here (no driver, no library, no GPU); the message says which."""


@dataclass
class GpuReading:
    """One GPU at one moment. Units: bytes, watts, degrees Celsius, MHz, percent."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    utilization_gpu_pct: float | None = None
    utilization_memory_pct: float | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    throttle_reasons: int | None = None
    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    pcie_link_gen: int | None = None
    pcie_link_gen_max: int | None = None
    pcie_link_width: int | None = None
    pcie_link_width_max: int | None = None
    pcie_replay_counter: int | None = None
    xid_events: list[int] = field(default_factory=list)
    """XID errors that happened since the previous reading."""
    unsupported: dict[str, str] = field(default_factory=dict)

    @property
    def throttle_names(self) -> list[str]:
        bits = self.throttle_reasons or 0
        return [name for bit, name in THROTTLE_REASONS.items() if bits & bit]

    def faults(self) -> list[str]:
        """What is wrong with this GPU, worded for an operator (empty when healthy)."""
        out = []
        if self.remap_failed:
            out.append("row remapping failed: the GPU needs service")
        if self.remap_pending:
            out.append("a row remap is pending: reset the GPU")
        if self.ecc_uncorrected_volatile:
            out.append(f"{self.ecc_uncorrected_volatile} uncorrectable ECC errors")
        if self.xid_events:
            out.append("XID errors " + ", ".join(map(str, self.xid_events)))
        if (self.throttle_reasons or 0) & BAD_THROTTLE_MASK:
            out.append("throttled: " + ", ".join(self.throttle_names))
        if (
            self.pcie_link_width
            and self.pcie_link_width_max
            and (self.pcie_link_width < self.pcie_link_width_max)
        ):
            out.append(f"PCIe link x{self.pcie_link_width} of x{self.pcie_link_width_max}")
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    """An NVML session: open once, read many times, close."""

    def __init__(self, nvml: Any = None):
        self._nvml = nvml
        self._handles: list[Any] = []
        self._events = None

    def open(self) -> NvmlReader:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise NvmlUnavailable("the nvidia-ml-py package is not installed") from None
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML: {exc}") from None
        # XID errors arrive as events; some virtual machines do not deliver them.
        try:
            self._events = nvml.nvmlEventSetCreate()
            for handle in self._handles:
                nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, self._events
                )
        except nvml.NVMLError:
            self._events = None
        return self

    def close(self) -> None:
        nvml = self._nvml
        if nvml is None:
            return
        with contextlib.suppress(Exception):
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
            nvml.nvmlShutdown()
        self._handles, self._events = [], None

    @property
    def xid_events_supported(self) -> bool:
        return self._events is not None

    def _xids(self) -> dict[int, list[int]]:
        """XID errors waiting in the event set, by GPU index."""
        nvml, out = self._nvml, {}
        if self._events is None:
            return out
        uuids = {self._uuid(h): i for i, h in enumerate(self._handles)}
        for _ in range(64):  # bounded: a storm of events must not stall a reading
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError:
                break  # NVML_ERROR_TIMEOUT: nothing (more) waiting
            index = uuids.get(self._uuid(event.device), 0)
            out.setdefault(index, []).append(int(event.eventData))
        return out

    def _uuid(self, handle) -> str:
        return _text(self._nvml.nvmlDeviceGetUUID(handle))

    def read(self) -> list[GpuReading]:
        xids = self._xids()
        return [self._read_device(i, h, xids.get(i, [])) for i, h in enumerate(self._handles)]

    def _read_device(self, index: int, h: Any, xids: list[int]) -> GpuReading:
        nvml = self._nvml
        r = GpuReading(
            index=index,
            uuid=self._uuid(h),
            name=_text(nvml.nvmlDeviceGetName(h)),
            pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(h).busId),
            xid_events=xids,
        )

        def get(what: str, fn, *args):
            try:
                return fn(h, *args)
            except nvml.NVMLError as exc:
                r.unsupported[what] = str(exc)
                return None

        util = get("utilization", nvml.nvmlDeviceGetUtilizationRates)
        if util is not None:
            r.utilization_gpu_pct, r.utilization_memory_pct = util.gpu, util.memory
        memory = get("memory", nvml.nvmlDeviceGetMemoryInfo)
        if memory is not None:
            r.memory_total_bytes, r.memory_used_bytes = memory.total, memory.used
            r.memory_free_bytes = memory.free
        r.temperature_c = get(
            "temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU
        )
        power = get("power", nvml.nvmlDeviceGetPowerUsage)
        r.power_w = power / 1000 if power is not None else None
        limit = get("power_limit", nvml.nvmlDeviceGetEnforcedPowerLimit)
        r.power_limit_w = limit / 1000 if limit is not None else None
        r.sm_clock_mhz = get("sm_clock", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        r.memory_clock_mhz = get("memory_clock", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM)
        r.throttle_reasons = get("throttle_reasons", nvml.nvmlDeviceGetCurrentClocksEventReasons)
        r.ecc_corrected_volatile = get(
            "ecc_corrected",
            nvml.nvmlDeviceGetTotalEccErrors,
            nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        r.ecc_uncorrected_volatile = get(
            "ecc_uncorrected",
            nvml.nvmlDeviceGetTotalEccErrors,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        rows = get("remapped_rows", nvml.nvmlDeviceGetRemappedRows)
        if rows is not None:
            correctable, uncorrectable, pending, failed = rows
            r.remapped_rows_correctable, r.remapped_rows_uncorrectable = (
                correctable,
                uncorrectable,
            )
            r.remap_pending, r.remap_failed = bool(pending), bool(failed)
        r.pcie_link_gen = get("pcie_link_gen", nvml.nvmlDeviceGetCurrPcieLinkGeneration)
        r.pcie_link_gen_max = get("pcie_link_gen_max", nvml.nvmlDeviceGetMaxPcieLinkGeneration)
        r.pcie_link_width = get("pcie_link_width", nvml.nvmlDeviceGetCurrPcieLinkWidth)
        r.pcie_link_width_max = get("pcie_link_width_max", nvml.nvmlDeviceGetMaxPcieLinkWidth)
        r.pcie_replay_counter = get("pcie_replay_counter", nvml.nvmlDeviceGetPcieReplayCounter)
        return r
