"""The endpoint record an instance job writes so the gateway can find and time it."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from appliance.atomic_files import write_text


class InstanceEndpoint(BaseModel):
    """Where an instance listens and when each start-up phase finished (epoch seconds)."""

    job_id: int
    model: str
    node: str = ""
    host: str
    port: int
    pid: int
    device: str = "cpu"
    gpus: str = ""
    phases: dict[str, float] = Field(default_factory=dict)
    can_sleep: bool = False
    """The server has vLLM's sleep endpoints: the gateway may park it."""
    exit_code: int | None = None
    tls: bool = False
    """The server answers HTTPS with its node's certificate from the internal CA."""

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


def endpoint_path(instances_dir: Path, job_id: int) -> Path:
    return instances_dir / f"{job_id}.json"


def write_endpoint(instances_dir: Path, endpoint: InstanceEndpoint) -> None:
    """Write atomically: a reader never sees half a file."""
    write_text(endpoint_path(instances_dir, endpoint.job_id), endpoint.model_dump_json())


def read_endpoint(instances_dir: Path, job_id: int) -> InstanceEndpoint | None:
    """The job's endpoint, or None while the job has not written one (or wrote garbage)."""
    try:
        return InstanceEndpoint.model_validate(
            json.loads(endpoint_path(instances_dir, job_id).read_text())
        )
    except (OSError, ValueError):
        return None
