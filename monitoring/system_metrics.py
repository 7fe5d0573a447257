"""This host's CPU, memory, disks and network (psutil) as Prometheus metrics under
node_exporter's names, so node_exporter dashboards work unchanged."""

from __future__ import annotations

import os

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Pseudo and container filesystems say nothing about this host's disks.
_SKIP_FSTYPES = {"overlay", "squashfs", "tmpfs", "devtmpfs", "proc", "sysfs", "nsfs", "autofs"}


def system_families() -> list[Metric]:
    cpu = CounterMetricFamily(
        "node_cpu_seconds_total", "Seconds the CPUs spent in each mode.", labels=["cpu", "mode"]
    )
    for index, times in enumerate(psutil.cpu_times(percpu=True)):
        for mode, value in times._asdict().items():
            if mode in ("guest", "guest_nice"):
                continue  # node_exporter counts guest time inside user time too
            cpu.add_metric([str(index), mode], value)
    out: list[Metric] = [cpu]
    # Busy share of all CPUs since the previous reading: what a dashboard plots, without a rate.
    busy = GaugeMetricFamily(
        "appliance_cpu_busy_ratio",
        "Share of CPU time busy since the previous reading (0-1).",
        psutil.cpu_percent(interval=None) / 100,
    )
    out.append(busy)
    for minutes, value in zip((1, 5, 15), os.getloadavg(), strict=True):
        out.append(GaugeMetricFamily(f"node_load{minutes}", f"{minutes}m load average.", value))

    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    for name, value in (
        ("MemTotal", memory.total),
        ("MemAvailable", memory.available),
        ("MemFree", memory.free),
        ("Buffers", getattr(memory, "buffers", 0)),
        ("Cached", getattr(memory, "cached", 0)),
        ("SwapTotal", swap.total),
        ("SwapFree", swap.free),
    ):
        out.append(GaugeMetricFamily(f"node_memory_{name}_bytes", f"Memory: {name}.", value))

    labels = ["device", "fstype", "mountpoint"]
    size = GaugeMetricFamily("node_filesystem_size_bytes", "Filesystem size.", labels=labels)
    avail = GaugeMetricFamily(
        "node_filesystem_avail_bytes", "Space available to non-root users.", labels=labels
    )
    free = GaugeMetricFamily("node_filesystem_free_bytes", "Free space.", labels=labels)
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _SKIP_FSTYPES:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue  # unmounted meanwhile, or not readable
        key = [part.device, part.fstype, part.mountpoint]
        size.add_metric(key, usage.total)
        avail.add_metric(key, usage.free)
        free.add_metric(key, usage.total - usage.used)
    out += [size, avail, free]

    read = CounterMetricFamily("node_disk_read_bytes_total", "Bytes read.", labels=["device"])
    written = CounterMetricFamily(
        "node_disk_written_bytes_total", "Bytes written.", labels=["device"]
    )
    for device, io in (psutil.disk_io_counters(perdisk=True) or {}).items():
        read.add_metric([device], io.read_bytes)
        written.add_metric([device], io.write_bytes)
    out += [read, written]

    rx = CounterMetricFamily(
        "node_network_receive_bytes_total", "Bytes received.", labels=["device"]
    )
    tx = CounterMetricFamily("node_network_transmit_bytes_total", "Bytes sent.", labels=["device"])
    rx_errors = CounterMetricFamily(
        "node_network_receive_errs_total", "Receive errors.", labels=["device"]
    )
    for device, io in psutil.net_io_counters(pernic=True).items():
        rx.add_metric([device], io.bytes_recv)
        tx.add_metric([device], io.bytes_sent)
        rx_errors.add_metric([device], io.errin)
    out += [rx, tx, rx_errors]
    return out
