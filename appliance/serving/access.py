"""How the gateway reaches the cluster. DirectAccess runs Slurm's commands and calls instances on
their nodes; BreakerAccess (appliance/serving/breaker/client.py) does both through the SSH circuit
breaker. The instance manager and the forwarder only talk to a ClusterAccess."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import ModelSpec
from appliance.security.node_tls import check_transport, instance_ssl
from appliance.serving.endpoint import read_endpoint
from appliance.serving.instance import Instance
from appliance.serving.job_script import instance_script, job_name_prefix
from appliance.serving.stored_models import StoredModels
from appliance.slurm.client import SlurmClient
from appliance.slurm.records import SlurmJob, gpu_count
from appliance.store.for_instances import StoreForInstances

log = logging.getLogger(__name__)

JSON_HEADERS = {"content-type": "application/json"}
# Node states (drained or not) are re-read at most this often; a drain is an admin's action.
NODE_STATE_MAX_AGE_S = 5.0


class UpstreamError(Exception):
    """An instance could not be reached, or broke off, on a transport other than plain HTTP."""


class TransportLost(UpstreamError):
    """The way to the instance broke, not the instance (the breaker's session ended): the
    request may go to the same instance again, over the way that replaces it."""


@dataclass
class InstanceAddress:
    """Where a started instance answers, and the start-up phases its job recorded."""

    url: str
    phases: dict[str, float] = field(default_factory=dict)
    can_sleep: bool = False


def log_tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file ("" when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(tail)


class ClusterAccess(ABC):
    """What the gateway may do on the cluster: instance jobs and requests to instances."""

    async def start(self) -> None:  # noqa: B027 - most ways need no start
        """Learn what is needed about the cluster before the first job poll."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""

    @abstractmethod
    async def submit(
        self, spec: ModelSpec, preemptible: bool = False, avoid: frozenset[str] = frozenset()
    ) -> int:
        """Submit one instance job of `spec`, in the preemptible partition if `preemptible`,
        on none of the nodes in `avoid` (where an instance is leaving); its job id."""

    @abstractmethod
    async def cancel(self, job_id: int) -> None:
        """Cancel an instance job (a finished one is fine)."""

    @abstractmethod
    async def jobs(self) -> list[SlurmJob]:
        """The instance jobs of this appliance that Slurm still lists (ended ones too, for a
        few minutes: their state says how they ended), with `node_drained` filled in."""

    @abstractmethod
    async def address(self, inst: Instance) -> InstanceAddress | None:
        """Where the instance answers, once its job has registered it."""

    @abstractmethod
    async def healthy(self, inst: Instance) -> bool:
        """Whether the instance answers its health check."""

    @abstractmethod
    async def open(self, inst: Instance, path: str, raw: bytes):
        """POST `raw` to `path` on the instance. The answer has aiohttp's ClientResponse surface
        (status, headers, read, content.iter_any, release, close); failures raise
        aiohttp.ClientError, TimeoutError or UpstreamError."""

    def failure_detail(self, inst: Instance) -> str:
        """What is known of why an instance's job ended before it was ready."""
        return ""

    async def sleep(self, inst: Instance) -> None:
        """Put the instance's server to sleep (vLLM's sleep mode, level 1: weights to host
        memory, KV cache freed); it answers requests again after `wake`."""
        await self._control(inst, "/sleep")

    async def wake(self, inst: Instance) -> None:
        """Wake a sleeping instance's server: weights back on the GPU, KV cache allocated."""
        await self._control(inst, "/wake_up")

    async def _control(self, inst: Instance, path: str) -> None:
        try:
            resp = await self.open(inst, path, b"")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"{path} on instance {inst.job_id}: {exc}") from None
        try:
            body = await resp.read()
            if resp.status != 200:
                detail = body[:200].decode(errors="replace")
                raise UpstreamError(f"{path} on instance {inst.job_id}: {resp.status} {detail}")
        finally:
            resp.release()


class DirectAccess(ClusterAccess):
    """Slurm commands on this host; instances reached over HTTP on their nodes."""

    def __init__(
        self,
        settings: ApplianceSettings,
        slurm: SlurmClient,
        client: aiohttp.ClientSession,
        stored: StoredModels | None = None,
    ):
        self.settings = settings
        self.slurm = slurm
        self.client = client
        # The internal CA verifies every instance; its certificate exists before the first job.
        self._ssl = instance_ssl(settings)
        self._probe = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=2.0),
            connector=aiohttp.TCPConnector(ssl=self._ssl or True),
        )
        self.stored = stored or StoreForInstances(settings, slurm, self._probe)
        self._node_addr: dict[str, str] = {}
        self._drained: set[str] = set()
        self._nodes_at = 0.0
        self._cluster_gpus = 0

    async def start(self) -> None:
        await self._refresh_nodes()

    async def close(self) -> None:
        await self._probe.close()

    async def _refresh_nodes(self) -> None:
        try:
            nodes = await asyncio.to_thread(self.slurm.nodes)
        except ApplianceError as exc:
            log.warning("cannot list Slurm nodes: %s", exc)
            return
        self._node_addr = {n.name: n.address or n.name for n in nodes}
        self._drained = {n.name for n in nodes if n.drained}
        self._nodes_at = time.monotonic()
        self._cluster_gpus = max((gpu_count(n.gres) for n in nodes), default=0)

    async def submit(
        self, spec: ModelSpec, preemptible: bool = False, avoid: frozenset[str] = frozenset()
    ) -> int:
        script = await instance_script(
            self.settings,
            self.stored,
            spec,
            self._cluster_gpus,
            preemptible=preemptible,
            avoid=avoid,
        )
        job_id = await asyncio.to_thread(self.slurm.submit, script)
        log.info("submitted instance job %s of %s", job_id, spec.name)
        return job_id

    async def cancel(self, job_id: int) -> None:
        await asyncio.to_thread(self.slurm.cancel, job_id)

    async def jobs(self) -> list[SlurmJob]:
        found = await asyncio.to_thread(self.slurm.jobs, job_name_prefix(self.settings))
        stale = time.monotonic() - self._nodes_at >= NODE_STATE_MAX_AGE_S
        if stale or any(j.node and j.node not in self._node_addr for j in found):
            await self._refresh_nodes()
        for job in found:
            job.node_drained = job.node in self._drained
        return found

    async def address(self, inst: Instance) -> InstanceAddress | None:
        endpoint = read_endpoint(self.settings.instances_dir, inst.job_id)
        if endpoint is None:
            return None
        host = endpoint.host
        if host in ("0.0.0.0", "::"):
            host = self._node_addr.get(inst.node, inst.node)
        url = f"{'https' if endpoint.tls else 'http'}://{host}:{endpoint.port}"
        check_transport(self.settings, url, f"instance {inst.job_id} of {inst.model}")
        return InstanceAddress(url, dict(endpoint.phases), endpoint.can_sleep)

    def _tls(self, inst: Instance) -> dict:
        """aiohttp's TLS arguments for the instance: its node's name is what its certificate
        must be for (the address it is reached at may be any of the node's)."""
        if self._ssl is None or not inst.url or not inst.url.startswith("https:"):
            return {}
        return {"ssl": self._ssl, "server_hostname": inst.node or None}

    async def healthy(self, inst: Instance) -> bool:
        if inst.url is None:
            return False
        try:
            health = inst.url + self.settings.serving.health_path
            async with self._probe.get(health, **self._tls(inst)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def open(self, inst: Instance, path: str, raw: bytes) -> aiohttp.ClientResponse:
        return await self.client.post(
            inst.url + path, data=raw, headers=JSON_HEADERS, **self._tls(inst)
        )

    def failure_detail(self, inst: Instance) -> str:
        path = self.settings.log_dir / f"instance-{inst.model}-{inst.job_id}.log"
        return log_tail(path, self.settings.serving.log_tail_lines)


def cluster_access(
    settings: ApplianceSettings, slurm: SlurmClient, client: aiohttp.ClientSession
) -> ClusterAccess:
    """The configured way to the cluster: through the breaker when it is enabled."""
    if settings.breaker.enabled:
        # The breaker's client builds on this module (a cycle at the top).
        from appliance.serving.breaker.client import BreakerAccess

        return BreakerAccess(settings)
    return DirectAccess(settings, slurm, client)
