"""The cluster side of the circuit breaker: what each command of the grammar does
(grammar.py). Only instance jobs of this appliance can be stopped or reached,
only catalog models started (placed as the gateway's direct access places them), only the
instance's own endpoint (from its endpoint file) called."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import aiohttp

from appliance.config import ApplianceSettings
from appliance.models.catalog import load_catalog
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
# How long a job seen running as an instance of this appliance is taken as one without asking
# Slurm again (a session's forwards; each listing renews it). Its endpoint file is read for
# every request all the same, so a job that ended and deregistered is refused at once.
VERIFIED_FOR_S = 5.0


class Reply(Protocol):
    """Where a command's answer goes: one JSON head, then (a forward) the body as it comes."""

    async def head(self, data: dict) -> None: ...

    async def data(self, chunk: bytes) -> None: ...


class BreakerActions:
    """Runs parsed commands against this cluster; one per process (a session runs many
    commands at once on it, sharing its HTTP connections to the instances)."""

    def __init__(self, settings: ApplianceSettings, slurm: SlurmClient):
        self.settings = settings
        self.slurm = slurm
        self._http: aiohttp.ClientSession | None = None
        # Job id -> when it was last seen running as an instance of this appliance.
        self._verified: dict[int, float] = {}

    async def __aenter__(self) -> BreakerActions:
        gw = self.settings.gateway
        timeout = aiohttp.ClientTimeout(sock_connect=5.0, sock_read=gw.request_timeout_s)
        # No total timeout: a stream lasts as long as its answer. Instances and the nodes' store
        # services serve HTTPS: verified against the internal CA.
        node_tls.ensure_internal_ca(self.settings)  # first start of a single host: before jobs
        self._http = aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            connector=aiohttp.TCPConnector(ssl=node_tls.instance_ssl(self.settings) or True),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._http is not None
        await self._http.close()

    async def run(self, command: Command, body: bytes, reply: Reply) -> None:
        """Run `command` (`body`: a forward POST's request body); Refused when what it names is
        not allowed."""
        if isinstance(command, Ping):
            await reply.head({"pong": True})
        elif isinstance(command, ListInstances):
            await reply.head({"instances": await self._instances()})
        elif isinstance(command, Start):
            await reply.head({"job_id": await self._start(command)})
        elif isinstance(command, Stop):
            if await self._instance_job(command.job_id, missing_ok=True) is not None:
                await asyncio.to_thread(self.slurm.cancel, command.job_id)
            self._verified.pop(command.job_id, None)
            await reply.head({"stopped": command.job_id})
        elif isinstance(command, Forward):
            await self._forward(command, body, reply)
        else:  # a session inside a session
            raise Refused("not a command of a session")

    async def _instances(self) -> list[dict]:
        """Instance jobs Slurm still lists (ended ones too, so the gateway learns how they
        ended), with a health probe of each registered running one."""
        prefix = job_name_prefix(self.settings)
        jobs = await asyncio.to_thread(self.slurm.jobs, prefix)
        nodes = await asyncio.to_thread(self.slurm.nodes) if jobs else []
        drained = {n.name for n in nodes if n.drained}
        endpoints = {
            j.job_id: e
            for j in jobs
            if j.state == "RUNNING"
            and (e := read_endpoint(self.settings.instances_dir, j.job_id)) is not None
        }
        probes = await asyncio.gather(*(self._healthy(e.url) for e in endpoints.values()))
        healthy = dict(zip(endpoints, probes, strict=True))
        now = time.monotonic()
        self._verified = dict.fromkeys(endpoints, now)
        return [
            {
                "job_id": job.job_id,
                "model": job.name.removeprefix(prefix),
                "state": job.state,
                "reason": job.reason,
                "node": job.node,
                # Where a pending job may start (--nodelist): eviction makes room there.
                "required_nodes": job.required_nodes,
                "submit_time": job.submit_time,
                "registered": job.job_id in endpoints,
                "healthy": healthy.get(job.job_id, False),
                "phases": endpoints[job.job_id].phases if job.job_id in endpoints else {},
                "can_sleep": job.job_id in endpoints and endpoints[job.job_id].can_sleep,
                "partition": job.partition,
                "preempted_at": job.preempt_time,
                "leave_by": job.grace_end,
                # Its time limit (or end of grace time): a successor starts before it.
                "ends_at": job.end_time,
                "node_drained": job.node in drained,
            }
            for job in jobs
        ]

    async def _healthy(self, url: str) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(
                url + self.settings.serving.health_path,
                timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _start(self, command: Start) -> int:
        spec = load_catalog(self.settings).get(command.model)
        if spec is None:
            raise Refused("unknown model")
        nodes = await asyncio.to_thread(self.slurm.nodes)
        gpus = max((gpu_count(n.gres) for n in nodes), default=0)
        assert self._http is not None
        try:
            script = await instance_script(  # asks the nodes' store services
                self.settings,
                StoreForInstances(self.settings, self.slurm, self._http),
                spec,
                gpus,
                preemptible=command.preemptible,
                avoid=command.avoid,
            )
        except ModelNotInstalled:
            raise Refused("model not installed") from None
        return await asyncio.to_thread(self.slurm.submit, script)

    async def _instance_job(self, job_id: int, missing_ok: bool = False) -> str | None:
        """The job's state if it is an instance of this appliance (None for a job Slurm no
        longer lists, with `missing_ok`); any other job is refused."""
        found = await asyncio.to_thread(self.slurm.job_state, job_id)
        if found is None and missing_ok:
            return None
        if found is None or not found[1].startswith(job_name_prefix(self.settings)):
            raise Refused("not an instance job of this appliance")
        return found[0]

    async def _running_instance(self, job_id: int) -> bool:
        seen = self._verified.get(job_id)
        if seen is not None and time.monotonic() - seen < VERIFIED_FOR_S:
            return True
        running = await self._instance_job(job_id) == "RUNNING"
        if running:
            self._verified[job_id] = time.monotonic()
        return running

    async def _forward(self, command: Forward, body: bytes, reply: Reply) -> None:
        running = await self._running_instance(command.job_id)
        endpoint = read_endpoint(self.settings.instances_dir, command.job_id)
        if not running or endpoint is None or endpoint.exit_code is not None:
            raise Refused("instance not running")
        limit = self.settings.gateway.max_request_bytes
        if len(body) > limit:
            raise Refused(f"request body larger than {limit} bytes")
        if command.method == "GET" and body:
            raise Refused("a GET has no body")
        assert self._http is not None
        async with self._http.request(
            command.method,
            endpoint.url + command.path,
            data=body or None,
            headers={"content-type": "application/json"} if body else {},
        ) as response:
            await reply.head(
                {
                    "status": response.status,
                    "content_type": response.headers.get("content-type", ""),
                }
            )
            # iter_any: whatever has come, at once; a stream's tokens go out as they come.
            async for chunk in response.content.iter_any():
                await reply.data(chunk)
