"""What this machine has (OS, CPUs, memory, disks, GPUs, init system), read through a probe.

Standard library only: the installer plans (and `--dry-run` prints) before any package is
installed. Detection goes through a `Probe`, so tests replay hardware captured on real machines
(`python3 -m appliance.installer capture > profile.json`; see tests/unit/testdata/hardware/).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,pci.bus_id,driver_version",
    "--format=csv,noheader,nounits",
]
DF = ["df", "-P", "-B1", "-T"]
# Pseudo and memory file systems are not places to keep models.
_NOT_DISKS = frozenset(
    {"tmpfs", "devtmpfs", "proc", "sysfs", "squashfs", "efivarfs", "cgroup", "cgroup2", "shm"}
)


class Probe(Protocol):
    """Where detection reads from: this machine, or a capture of another one."""

    def run(self, argv: list[str]) -> str | None:
        """The program's standard output, or None when it is missing or fails."""

    def read(self, path: str) -> str | None:
        """A file's text, or None when it cannot be read."""

    def exists(self, path: str) -> bool:
        """Whether the path exists."""


class LocalProbe:
    """Reads this machine."""

    def run(self, argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    def read(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return os.path.exists(path)


# What `capture` records and `RecordedProbe` replays: every command and file detection uses.
CAPTURED_COMMANDS = [["nproc"], ["uname", "-m"], NVIDIA_SMI_QUERY, DF]
CAPTURED_FILES = ["/etc/os-release", "/proc/meminfo", "/proc/sys/kernel/hostname"]
CAPTURED_PATHS = ["/run/systemd/system"]


@dataclass
class RecordedProbe:
    """Replays a capture: {"commands": {argv joined by spaces: stdout or null}, "files": {...},
    "exists": [paths], "packages": [installed Debian packages]}."""

    commands: dict[str, str | None]
    files: dict[str, str | None]
    exists_paths: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RecordedProbe:
        data = json.loads(path.read_text())
        return cls(data["commands"], data["files"], data.get("exists", []), data["packages"])

    def run(self, argv: list[str]) -> str | None:
        if argv[:2] == ["dpkg-query", "-W"]:
            return "install ok installed" if argv[-1] in self.packages else None
        return self.commands.get(" ".join(argv))

    def read(self, path: str) -> str | None:
        return self.files.get(path)

    def exists(self, path: str) -> bool:
        return path in self.exists_paths


def capture(probe: Probe, packages: list[str]) -> dict:
    """A machine's detection inputs, to replay it elsewhere (the hardware test profiles)."""
    return {
        "commands": {" ".join(argv): probe.run(argv) for argv in CAPTURED_COMMANDS},
        "files": {path: probe.read(path) for path in CAPTURED_FILES},
        "exists": [path for path in CAPTURED_PATHS if probe.exists(path)],
        "packages": installed_packages(probe, packages),
    }


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as nvidia-smi reports it."""

    index: int
    name: str
    memory_mib: int
    bus_id: str

    @property
    def memory_gb(self) -> float:
        """Memory in GB (10^9 bytes), the unit the catalog sizes models in."""
        return self.memory_mib * 2**20 / 1e9

    @property
    def kind(self) -> str:
        """Short lowercase model for Slurm's GRES type: "NVIDIA H100 80GB HBM3" -> "h100"."""
        for token in self.name.split():
            if re.fullmatch(r"[A-Za-z]{1,4}\d{2,4}[A-Za-z]?", token) and token.upper() != "NVIDIA":
                return token.lower()
        return "gpu"


@dataclass(frozen=True)
class Disk:
    """A mounted file system that can hold models and state."""

    mount: str
    fstype: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Hardware:
    """Everything the installer plans from."""

    hostname: str
    os_id: str
    os_version: str
    os_name: str
    arch: str
    cpus: int
    memory_mib: int
    disks: tuple[Disk, ...]
    gpus: tuple[Gpu, ...]
    gpu_driver: str | None
    systemd: bool

    @property
    def memory_gb(self) -> float:
        return self.memory_mib * 2**20 / 1e9

    @property
    def gpu_memory_gb(self) -> float:
        """Memory of the smallest GPU (instances may land on any), 0 without GPUs."""
        return min((g.memory_gb for g in self.gpus), default=0.0)

    def disk_for(self, path: Path) -> Disk | None:
        """The file system that holds `path` (the longest mount point above it)."""
        text = str(path)
        best = None
        for disk in self.disks:
            mount = disk.mount.rstrip("/") + "/"
            longer = best is None or len(disk.mount) > len(best.mount)
            if (text + "/").startswith(mount) and longer:
                best = disk
        return best

    def describe_gpus(self) -> str:
        if not self.gpus:
            return "none"
        names = sorted({g.name for g in self.gpus})
        memory = self.gpus[0].memory_mib / 1024
        return f"{len(self.gpus)}x {', '.join(names)} ({memory:.0f} GiB each)"

    def to_json(self) -> dict:
        return asdict(self)


def parse_os_release(text: str | None) -> tuple[str, str, str]:
    """(ID, VERSION_ID, PRETTY_NAME) of /etc/os-release; unknowns as "unknown"."""
    fields = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', text or "", flags=re.MULTILINE))
    return (
        fields.get("ID", "unknown"),
        fields.get("VERSION_ID", "unknown"),
        fields.get("PRETTY_NAME", "unknown"),
    )


def parse_meminfo(text: str | None) -> int:
    """MemTotal of /proc/meminfo in MiB."""
    match = re.search(r"^MemTotal:\s+(\d+) kB", text or "", flags=re.MULTILINE)
    return int(match.group(1)) // 1024 if match else 0


def parse_gpus(text: str | None) -> tuple[tuple[Gpu, ...], str | None]:
    """The GPUs of `nvidia-smi --query-gpu=index,name,memory.total,pci.bus_id,driver_version`
    (CSV, no header, no units) and the driver version."""
    gpus = []
    driver = None
    for line in (text or "").splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        index, name, memory, bus, driver = cells
        gpus.append(Gpu(int(index), name, int(float(memory)), bus))
    return tuple(sorted(gpus, key=lambda g: g.index)), driver


def parse_df(text: str | None) -> tuple[Disk, ...]:
    """Real file systems of `df -P -B1 -T` (pseudo and memory file systems left out)."""
    disks = []
    for line in (text or "").splitlines()[1:]:
        cells = line.split()
        if len(cells) < 7 or cells[1] in _NOT_DISKS:
            continue
        try:
            total, free = int(cells[2]), int(cells[4])
        except ValueError:
            continue
        mount = " ".join(cells[6:])
        if mount.startswith(("/proc", "/sys", "/dev")) and mount != "/dev/shm":
            continue
        disks.append(Disk(mount, cells[1], total, free))
    return tuple(disks)


def detect(probe: Probe) -> Hardware:
    """Read the machine through `probe`."""
    os_id, os_version, os_name = parse_os_release(probe.read("/etc/os-release"))
    gpus, driver = parse_gpus(probe.run(NVIDIA_SMI_QUERY))
    cpus = (probe.run(["nproc"]) or "").strip()
    return Hardware(
        hostname=(probe.read("/proc/sys/kernel/hostname") or "localhost").strip().split(".")[0],
        os_id=os_id,
        os_version=os_version,
        os_name=os_name,
        arch=(probe.run(["uname", "-m"]) or "unknown").strip(),
        cpus=int(cpus) if cpus.isdigit() else 1,
        memory_mib=parse_meminfo(probe.read("/proc/meminfo")),
        disks=parse_df(probe.run(DF)),
        gpus=gpus,
        gpu_driver=driver,
        systemd=probe.exists("/run/systemd/system"),
    )


def installed_packages(probe: Probe, names: list[str]) -> list[str]:
    """Which of the Debian packages `names` are installed."""
    return [
        name
        for name in names
        if (probe.run(["dpkg-query", "-W", "-f=${Status}", name]) or "").strip()
        == "install ok installed"
    ]
