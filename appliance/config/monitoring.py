"""Configuration of monitoring: collection intervals, history, node health checks, Prometheus."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MonitoringSettings(BaseModel):
    """What is collected how often, how much history is kept, and what makes a node unhealthy."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Run the collectors in the gateway and serve /metrics."""

    interval_s: float = Field(default=1.0, ge=0.1, le=60)
    """How often the host's components (CPU, memory, disks, network, GPUs) are read, and the
    history is sampled."""

    cluster_interval_s: float = Field(default=10.0, ge=1, le=600)
    """How often Slurm is asked for nodes and jobs (each ask runs sinfo and squeue)."""

    task_interval_s: float = Field(default=5.0, ge=1, le=600)
    """How often each serving instance's vLLM metrics are scraped."""

    history_points: int = Field(default=1440, ge=10, le=100_000)
    """Samples kept per series in the embedded history (1440 at 5 s: two hours)."""

    history_step_s: float = Field(default=5.0, ge=1, le=3600)
    """Seconds between two samples of the embedded history."""

    history_max_series: int = Field(default=4000, ge=10, le=1_000_000)
    """Most series the embedded history keeps; more are counted as dropped."""

    prometheus_url: str | None = None
    """A Prometheus server that scrapes /metrics; when set, the dashboards read history from it
    rather than from the embedded history."""

    scratch_dirs: list[str] = Field(default_factory=lambda: ["{state_dir}/scratch/{node}"])
    """Directories each node must be able to write to, with free space; `{node}` and
    `{state_dir}` are filled in. A node whose scratch is full or read-only is drained."""

    min_free_percent: float = Field(default=5.0, ge=0, le=100)
    """A scratch filesystem with less free space than this is full."""

    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """A scratch filesystem with fewer free bytes than this is full."""

    expected_gpus: int | None = Field(default=None, ge=0)
    """GPUs every node must show; default: what gres.conf configures for the node."""

    min_memory_gb: float | None = Field(default=None, ge=0)
    """Memory a node must have; default: what slurm.conf configures for the node (RealMemory)."""

    required_services: list[str] = Field(default_factory=list)
    """Process names that must be running on every node (e.g. an exporter, the store service);
    `munged` is added when slurm.conf authenticates with munge."""

    health_interval_s: int = Field(default=60, ge=10, le=86400)
    """How often Slurm runs the node health check on every node (HealthCheckInterval)."""
