"""The cluster side of the circuit breaker: what each command of the grammar does
(grammar.py). Only instance jobs of this appliance can be stopped or reached,
only catalog models started (placed as the gateway's direct access places them), only the
instance's own endpoint (from its endpoint file) called."""

from __future__ import annotations

import asyncio
import json
from typing import BinaryIO

import aiohttp
import httpx

from appliance.config import ApplianceSettings
from appliance.models.catalog import ModelSpec, load_catalog
from appliance.security import node_tls
from appliance.serving.breaker.grammar import (
    Command,
    Forward,
    ListInstances,
    Ping,
    Refused,
    Start,
    Stop,
)
from appliance.serving.endpoint import read_endpoint
from appliance.serving.job_script import ModelNotInstalled, instance_script, job_name_prefix
from appliance.slurm.client import SlurmClient
from appliance.slurm.records import gpu_count
from appliance.store.for_instances import StoreForInstances

# A health probe of an instance on its node, as part of a listing.
HEALTH_TIMEOUT_S = 2.0


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
            _line(stdout, {"job_id": self._start(command)})
        elif isinstance(command, Stop):
            if self._instance_job(command.job_id, missing_ok=True) is not None:
                self.slurm.cancel(command.job_id)
            _line(stdout, {"stopped": command.job_id})
        elif isinstance(command, Forward):
            self._forward(command, stdin, stdout)

    def _instances(self) -> list[dict]:
        """Instance jobs Slurm still lists (ended ones too, so the gateway learns how they
        ended), with a health probe of each registered running one."""
        out = []
        jobs = self.slurm.jobs(job_name_prefix(self.settings))
        drained = {n.name for n in self.slurm.nodes() if n.drained} if jobs else set()
        verify = node_tls.verify(self.settings)
        with httpx.Client(timeout=HEALTH_TIMEOUT_S, verify=verify) as client:
            for job in jobs:
                endpoint = read_endpoint(self.settings.instances_dir, job.job_id)
                running = job.state == "RUNNING" and endpoint is not None
                out.append(
                    {
                        "job_id": job.job_id,
                        "model": job.name.removeprefix(job_name_prefix(self.settings)),
                        "state": job.state,
                        "reason": job.reason,
                        "node": job.node,
                        # Where a pending job may start (--nodelist): eviction makes room there.
                        "required_nodes": job.required_nodes,
                        "submit_time": job.submit_time,
                        "registered": running,
                        "healthy": running and self._healthy(client, endpoint.url),
                        "phases": endpoint.phases if endpoint else {},
                        "can_sleep": bool(endpoint and endpoint.can_sleep),
                        "partition": job.partition,
                        "preempted_at": job.preempt_time,
                        "leave_by": job.grace_end,
                        # Its time limit (or end of grace time): a successor starts before it.
                        "ends_at": job.end_time,
                        "node_drained": job.node in drained,
                    }
                )
        return out

    def _healthy(self, client: httpx.Client, url: str) -> bool:
        try:
            return client.get(url + self.settings.serving.health_path).status_code == 200
        except httpx.HTTPError:
            return False

    def _start(self, command: Start) -> int:
        spec = load_catalog(self.settings).get(command.model)
        if spec is None:
            raise Refused("unknown model")
        gpus = max((gpu_count(n.gres) for n in self.slurm.nodes()), default=0)
        try:
            script = asyncio.run(self._script(spec, gpus, command))
        except ModelNotInstalled:
            raise Refused("model not installed") from None
        return self.slurm.submit(script)

    async def _script(self, spec: ModelSpec, gpus: int, command: Start) -> str:
        ssl = node_tls.instance_ssl(self.settings) or True
        # Asks the nodes' store services, verifying them against the internal CA.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as probe:
            return await instance_script(
                self.settings,
                StoreForInstances(self.settings, self.slurm, probe),
                spec,
                gpus,
                preemptible=command.preemptible,
                avoid=command.avoid,
            )

    def _instance_job(self, job_id: int, missing_ok: bool = False) -> str | None:
        """The job's state if it is an instance of this appliance (None for a job Slurm no
        longer lists, with `missing_ok`); any other job is refused."""
        found = self.slurm.job_state(job_id)
        if found is None and missing_ok:
            return None
        if found is None or not found[1].startswith(job_name_prefix(self.settings)):
            raise Refused("not an instance job of this appliance")
        return found[0]

    def _forward(self, command: Forward, stdin: BinaryIO, stdout: BinaryIO) -> None:
        state = self._instance_job(command.job_id)
        endpoint = read_endpoint(self.settings.instances_dir, command.job_id)
        if state != "RUNNING" or endpoint is None:
            raise Refused("instance not running")
        limit = self.settings.gateway.max_request_bytes
        body = stdin.read(limit + 1) if command.method == "POST" else b""
        if len(body) > limit:
            raise Refused(f"request body larger than {limit} bytes")
        timeout = httpx.Timeout(self.settings.gateway.request_timeout_s, connect=5.0)
        with (
            httpx.Client(timeout=timeout, verify=node_tls.verify(self.settings)) as client,
            client.stream(
                command.method,
                endpoint.url + command.path,
                content=body or None,
                headers={"content-type": "application/json"} if body else {},
            ) as response,
        ):
            _line(
                stdout,
                {
                    "status": response.status_code,
                    "content_type": response.headers.get("content-type", ""),
                },
            )
            # No chunk size: httpx would hold bytes back until a chunk is full, and a stream's
            # tokens must go out as they come.
            for chunk in response.iter_raw():
                stdout.write(chunk)
                stdout.flush()
