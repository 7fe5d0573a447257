"""The cluster side of the circuit breaker: what each command of the grammar does
(security/breaker/grammar.py). Only instance jobs of this appliance can be stopped or reached,
only catalog models started, only the instance's own endpoint (from its endpoint file) called."""

from __future__ import annotations

import json
import re
from typing import BinaryIO

import httpx

from appliance.config import ApplianceSettings
from appliance.models.catalog import load_catalog
from appliance.serving.endpoint import read_endpoint
from appliance.serving.resources import plan_request
from appliance.serving.sbatch import job_name_prefix, render_instance_script
from appliance.slurm.client import SlurmClient
from security.breaker.grammar import Command, Forward, ListInstances, Ping, Refused, Start, Stop

_GPUS = re.compile(r"gpu(?::[^:,()]+)?:(\d+)")
CHUNK = 64 * 1024


def _line(out: BinaryIO, data: dict) -> None:
    out.write(json.dumps(data).encode() + b"\n")
    out.flush()


class BreakerActions:
    """Runs one parsed command against this cluster."""

    def __init__(self, settings: ApplianceSettings, slurm: SlurmClient):
        self.settings = settings
        self.slurm = slurm

    def run(self, command: Command, stdin: BinaryIO, stdout: BinaryIO) -> None:
        if isinstance(command, Ping):
            _line(stdout, {"pong": True})
        elif isinstance(command, ListInstances):
            _line(stdout, {"instances": self._instances()})
        elif isinstance(command, Start):
            _line(stdout, {"job_id": self._start(command.model)})
        elif isinstance(command, Stop):
            self._instance_job(command.job_id)
            self.slurm.cancel(command.job_id)
            _line(stdout, {"stopped": command.job_id})
        elif isinstance(command, Forward):
            self._forward(command, stdin, stdout)

    def _instances(self) -> list[dict]:
        out = []
        for job in self.slurm.jobs(job_name_prefix(self.settings)):
            if not job.active:
                continue  # squeue still lists jobs that ended a few minutes ago
            endpoint = read_endpoint(self.settings.instances_dir, job.job_id)
            out.append({
                "job_id": job.job_id,
                "model": job.name.removeprefix(job_name_prefix(self.settings)),
                "state": job.state,
                "reason": job.reason,
                "node": job.nodes[0] if job.nodes else "",
                "registered": endpoint is not None,
                "phases": endpoint.phases if endpoint else {},
            })  # fmt: skip
        return out

    def _start(self, model: str) -> int:
        spec = load_catalog(self.settings).get(model)
        if spec is None:
            raise Refused("unknown model")
        if not spec.installed(self.settings):
            raise Refused("model not installed")
        gpus = max((sum(map(int, _GPUS.findall(n.gres))) for n in self.slurm.nodes()), default=0)
        request = plan_request(spec, self.settings, gpus)
        script = render_instance_script(self.settings, spec, request, spec.model_dir(self.settings))
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        self.settings.instances_dir.mkdir(parents=True, exist_ok=True)
        return self.slurm.submit(script)

    def _instance_job(self, job_id: int):
        job = self.slurm.job(job_id)
        if job is None or not job.name.startswith(job_name_prefix(self.settings)):
            raise Refused("not an instance job of this appliance")
        return job

    def _forward(self, command: Forward, stdin: BinaryIO, stdout: BinaryIO) -> None:
        job = self._instance_job(command.job_id)
        endpoint = read_endpoint(self.settings.instances_dir, command.job_id)
        if job.state != "RUNNING" or endpoint is None:
            raise Refused("instance not running")
        limit = self.settings.gateway.max_request_bytes
        body = stdin.read(limit + 1) if command.method == "POST" else b""
        if len(body) > limit:
            raise Refused(f"request body larger than {limit} bytes")
        timeout = httpx.Timeout(self.settings.gateway.request_timeout_s, connect=5.0)
        with httpx.Client(timeout=timeout) as client, client.stream(
            command.method, endpoint.url + command.path, content=body or None,
            headers={"content-type": "application/json"} if body else {},
        ) as response:  # fmt: skip
            _line(stdout, {"status": response.status_code,
                           "content_type": response.headers.get("content-type", "")})  # fmt: skip
            for chunk in response.iter_raw(CHUNK):
                stdout.write(chunk)
                stdout.flush()
