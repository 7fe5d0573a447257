"""Configuration of model instances: how the Slurm job runs vLLM or the embedding server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# A Slurm node's name, as it also appears in a systemd unit's name and a socket's path.
NodeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ServingSettings(BaseModel):
    """How an instance job runs its model server."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    python: Path = Path(sys.executable)
    """Python interpreter that instance jobs run (it must have vLLM installed). Default: the one
    running the stack."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: GPU when the job was given one and the installed vLLM supports it, else CPU."""

    cpu_kv_cache_gib: float = Field(default=1.0, gt=0, le=1024)
    """KV-cache size (GiB) of an instance on CPU (VLLM_CPU_KVCACHE_SPACE)."""

    enforce_eager: bool = True
    """Run vLLM on CPU without graph compilation: ready in ~25 s instead of ~80 s, with the same
    throughput for small models. GPU instances always use CUDA graphs."""

    standby: bool = False
    """Start vLLM instances through each node's warm standby (`appliance standby serve`, one
    process per node with vLLM and torch already imported, that forks a server for each
    instance): a cold start skips Python's start and those imports (21.8 s of 43.6 s for an 8B
    model on an H100). Where no standby answers, the instance starts the usual way. The
    installer turns it on where the cluster has GPUs."""

    standby_nodes: list[NodeName] = Field(default_factory=list)
    """Slurm nodes on this host whose warm standby the installed services keep running while
    `standby` is on (a systemd unit `appliance-standby@<node>` each, or `appliance supervise`),
    and whose store service they always run (`appliance-store@<node>`). The installer lists
    this host's GPU nodes: `n1` of a local cluster, the host's own name on a multi-node
    cluster. With `standby` off, `appliance services restart` stops and disables the
    standbys."""

    keep_engines: Literal["gpu", "always", "off"] = "off"
    """With `standby`: an instance's vLLM server outlives its job, kept by the node's standby
    asleep without weights (about 3 GiB of its GPUs for the CUDA context and graphs), and the
    next job of the same model files on the same GPUs takes it over and loads the model's
    weights into it from the store, skipping vLLM's start (docs/gpu.md, "Kept engines"). A
    kept engine is dropped after `keep_engine_s`, as soon as another instance needs its GPUs,
    when another Slurm job gets any of them (the local cluster's prolog asks the standby), and
    when the standby stops. `gpu`: instances on a GPU (the installer's GPU profiles: a stopped
    8B model's first token in 3.9 s on an H100, against 68.3 s for vLLM's own start).
    `always`: CPU instances too, for tests of the path: vLLM's CPU backend cannot sleep, so a
    kept engine would hold all of its memory."""

    keep_engine_s: float = Field(default=900.0, gt=0)
    """How long an idle kept engine waits for the next job of its model files."""

    @property
    def keeps_engines(self) -> bool:
        """Whether nodes' standbys keep idle engines (which other Slurm jobs must drop)."""
        return self.standby and self.keep_engines != "off"

    sleep_mode: Literal["gpu", "always", "off"] = "gpu"
    """vLLM's sleep mode, so the gateway can park an idle instance (gateway.park_after_s): its
    weights move to host memory and its KV cache is freed, the job and its processes stay, and
    the next request wakes it in seconds instead of a cold start. `gpu`: instances on a GPU (a
    CPU instance frees nothing by sleeping). `always`: CPU instances too, where vLLM ignores the
    sleep itself (it exercises parking without a GPU). Sleep mode turns on vLLM's development
    endpoints on the instance's port (docs/gpu.md)."""

    time_limit_min: int | None = Field(default=None, ge=1)
    """Slurm time limit of instance jobs (`#SBATCH --time`), minutes; None: the partition's.
    Near the limit a successor takes over (gateway.successor_lead_s)."""

    extra_vllm_args: list[str] = Field(default_factory=list)
    """Extra arguments appended to every vLLM command line."""

    max_lora_rank: int = Field(default=64, ge=1, le=512)
    """Largest LoRA rank an instance of a `lora: true` model can load (vLLM --max-lora-rank)."""

    max_loras: int = Field(default=4, ge=1, le=256)
    """LoRA adapters one instance holds at once (vLLM --max-loras); more are swapped in."""

    tls: bool = True
    """Instances and embedding servers serve HTTPS with their node's certificate from the internal
    CA (<state_dir>/keys/tls, made by the installer, or at the gateway's first start on a single
    host), and the gateway verifies them against it. Off: plain HTTP (see `allow_plain_http`)."""

    allow_plain_http: bool = False
    """Let the gateway talk plain HTTP to an instance on another host. For development only:
    without it, such an instance is refused (its own host's loopback is always allowed)."""

    bind_host: str = "127.0.0.1"
    """Address instance servers bind to on their node. Set 0.0.0.0 (or the node's address) when
    the gateway runs on another host than the compute nodes."""

    gpu_memory_gb: float = Field(default=80.0, gt=0)
    """Memory of one GPU on the compute nodes. A model that needs less than a whole GPU gets GRES
    shards and a matching vLLM memory fraction, so several small models share one GPU."""

    log_tail_lines: int = Field(default=20, ge=0, le=1000)
    """Lines of an instance's log quoted in the error when it fails to start."""

    preemptible: bool = False
    """Serve in the gaps of the batch schedule: a model's instances above its `min_instances`
    run in `cluster.preemptible_partition`, batch jobs preempt them, and the gateway moves their
    running requests to other instances within the grace time. A model's own `preemptible`
    overrides it. The installer turns it on for a cluster that runs batch work (head)."""

    health_path: str = "/health"
    """Path of an instance's server that answers 200 once it can serve."""
