"""Configuration of the OpenAI-compatible gateway and its autoscaler."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GatewaySettings(BaseModel):
    """Where the gateway listens and how it starts, checks, routes to and retires instances."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address the gateway binds to. Use 0.0.0.0 to serve other machines."""

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port of the gateway."""

    health_interval_s: float = Field(default=2.0, ge=0.1, le=60)
    """Seconds between health checks of each instance."""

    job_poll_interval_s: float = Field(default=10.0, ge=0.5, le=600)
    """Seconds between Slurm job-state polls (squeue) while every instance is ready. While an
    instance is queued, starting, stopping or failing its health checks, jobs are polled on every
    check instead. Each poll costs the gateway host and slurmctld a little CPU."""

    preemption_poll_interval_s: float = Field(default=2.0, ge=0.5, le=60)
    """Seconds between job-state polls while preemptible instances run: Slurm reports a
    preemption only in the job list, so this is how late the gateway may learn of one (keep it
    well inside `cluster.preempt_grace_s`)."""

    drain_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """How long an instance that is leaving for another reason than preemption (its node is
    drained, consolidation) keeps serving the requests that could not move, before it is
    stopped."""

    rebalance: bool = True
    """Move running streams between a model's instances: from a busy instance to an idle one
    (when their in-flight counts differ by two or more), and off an instance the others can
    cover so it can be stopped (consolidation). Only moves the cost model approves
    (docs/preemption.md)."""

    rebalance_prefill_speedup: float = Field(default=20.0, ge=1, le=10000)
    """The rebalancing cost model's one constant: how many times faster an instance recomputes
    a token in a prefill than it generates one. A stream moves when its remaining tokens times
    this exceed the tokens the move recomputes (prompt plus generated). Higher: moves more
    readily."""

    consolidate_after_s: float = Field(default=60.0, gt=0)
    """An instance that has been given no new request for this long, and whose streams the
    model's other instances can take, is drained and stopped."""

    start_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    """How long a request waits for an instance of its model to become ready (scale from zero)
    before it gets an error."""

    keepalive_interval_s: float = Field(default=5.0, gt=0, le=60)
    """While a streaming request waits for an instance, an SSE comment is sent this often so
    clients and proxies keep the connection open."""

    idle_timeout_s: float = Field(default=900.0, ge=0)
    """An instance that has served no request for this long is stopped (down to the model's
    min_instances). 0 disables retirement. A model's own `idle_timeout_s` overrides it."""

    park_after_s: float = Field(default=300.0, ge=0)
    """An instance that can sleep (serving.sleep_mode) and has served no request for this long
    is parked: its GPU memory is freed and its job kept, and the next request wakes it in
    seconds. It is stopped at idle_timeout_s as any other. Only instances above the model's
    min_instances are parked. 0 disables parking."""

    routing: Literal["least_loaded", "prefix_affinity"] = "least_loaded"
    """How a request picks among a model's ready instances. `least_loaded`: fewest requests in
    flight. `prefix_affinity`: a conversation (its system prompt and first user message) stays
    on the instance that served it, whose prefix cache holds it, unless that instance is
    busier than the least loaded one by more than a few requests. The installer's GPU
    profiles set it (on an H100, later turns' p90 time to first token 0.42x of least_loaded's;
    on the CPU demo's tiny model, with a person's pause between turns, the p50 0.63x)."""

    successor_lead_s: float = Field(default=300.0, gt=0)
    """An instance whose job ends within this many seconds (its Slurm time limit) starts a
    successor, hands its streams over once the successor is ready, and ends: no downtime.
    Longer than a cold start of the largest model."""

    max_waiting_requests: int = Field(default=512, ge=1)
    """Requests that may wait for an instance of one model (while it starts, or while its job
    waits for room); one more gets 429 with Retry-After. Shared fairly: one user may fill three
    quarters of it, the last quarter is kept for users holding less than an equal share
    (serving/wait_queue.py)."""

    evict_for_waiting: bool = True
    """When a model's instance waits in Slurm's queue for resources while requests wait for it,
    stop the least recently used idle instance of another model (never one serving requests or
    kept for its model's min_instances), one at a time, until the job starts."""

    scale_up_queue_depth: int = Field(default=8, ge=1, le=10000)
    """Start one more instance (up to the model's max_instances) when the requests in flight per
    ready instance of a model reach this number."""

    max_retries: int = Field(default=2, ge=0, le=10)
    """How many other instances a request is tried on when its instance fails before anything
    was sent to the client."""

    request_timeout_s: float = Field(default=600.0, gt=0)
    """Upper bound for one upstream request, from sending it to its last byte."""

    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest accepted request body; bigger bodies get HTTP 413. Uploads have their own limits
    (`rag.max_upload_bytes`, `training.max_dataset_bytes`); the routes anyone may call without a
    key have `max_unauthenticated_request_bytes`."""

    max_unauthenticated_request_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    """Largest accepted body on the routes that need no key (sign-in, health); bigger bodies get
    HTTP 413 before they are read."""

    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses (or networks, e.g. 10.0.0.0/24) of reverse proxies whose `X-Forwarded-For` and
    `X-Forwarded-Proto` headers the gateway believes. Empty: the headers are ignored and the
    client is the address the connection comes from (what the audit log records)."""

    tls: bool = False
    """Serve HTTPS. Without `tls_cert`/`tls_key`, a self-signed certificate is made at the first
    start in <state_dir>/tls/ (clients then need that certificate to trust the gateway)."""

    tls_cert: Path | None = None
    """PEM certificate (chain) the operator provides."""

    tls_key: Path | None = None
    """PEM private key of `tls_cert` (mode 0600)."""

    session_ttl_s: float = Field(default=12 * 3600, gt=0, le=30 * 24 * 3600)
    """How long a sign-in (username and password, e.g. in the web app) stays valid. Signing
    out ends it earlier."""

    sign_in_max_failures: int = Field(default=5, ge=1, le=1000)
    """Failed sign-ins for one username within `sign_in_lockout_s` after which further tries are
    refused (HTTP 429) until the window has passed."""

    sign_in_lockout_s: float = Field(default=300.0, gt=0, le=86400)
    """The window of `sign_in_max_failures`."""

    sign_in_tracked_names: int = Field(default=10000, ge=10, le=1_000_000)
    """How many usernames the sign-in lockout remembers failures for; beyond that, the name
    whose last failure is oldest is forgotten. Bounds the gateway's memory whatever names are
    tried."""
