"""The instance manager's loop: polls Slurm's job list and the instances' endpoints, health-checks
ready instances, and hands each tick's end to the coordinator (drains, rebalancing, autoscaling)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import Catalog
from appliance.security.node_tls import PlainHttpRefused
from appliance.serving.access import ClusterAccess
from appliance.serving.instance import Instance, InstanceState
from appliance.serving.job_script import model_from_job_name
from appliance.serving.registry import InstanceRegistry
from appliance.slurm.records import SlurmJob

log = logging.getLogger(__name__)

# Consecutive failed health checks before a ready instance stops getting requests.
UNHEALTHY_AFTER = 2
# An unhealthy instance that does not recover within this many seconds is cancelled.
UNHEALTHY_GRACE_S = 30.0
# Polling period while something is being started or stopped (cold starts wait on it).
FAST_TICK_S = 0.25
# States in which an instance waits on the loop, which then ticks at FAST_TICK_S.
_BUSY_STATES = (
    InstanceState.PENDING,
    InstanceState.STARTING,
    InstanceState.STOPPING,
    InstanceState.DRAINING,
)


class Lifecycle(Protocol):
    """What the loop asks of the coordinator: stopping instances, and the rest of each tick."""

    async def retire(self, inst: Instance, reason: str) -> None: ...

    async def drain(self, inst: Instance, reason: str, leave_by: float | None = None) -> None: ...

    async def settle(self, now: float) -> None: ...


class HealthLoop:
    """Follows every instance's job and server, and moves its state along."""

    def __init__(
        self,
        settings: ApplianceSettings,
        catalog: Catalog,
        access: ClusterAccess,
        registry: InstanceRegistry,
        lifecycle: Lifecycle,
    ):
        self.settings = settings
        self.catalog = catalog
        self.access = access
        self.registry = registry
        self.lifecycle = lifecycle
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_job_poll = 0.0

    async def start(self) -> None:
        """Adopt instances left by an earlier gateway, then loop."""
        await self.poll_jobs()
        self._task = asyncio.create_task(self._run(), name="instance-manager")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        """Tick now rather than at the next interval."""
        self._wake.set()

    def mark_failed(self, inst: Instance) -> None:
        """A request on `inst` broke: stop routing to it until a health check says otherwise."""
        inst.state = InstanceState.UNHEALTHY
        inst.health_failures = max(inst.health_failures, UNHEALTHY_AFTER)
        inst.reason = "request failed"
        self.wake()

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving: one bad tick must not stop health checking
                log.exception("instance manager tick failed")
            busy = any(i.state in _BUSY_STATES for i in self.registry.instances())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(),
                    timeout=FAST_TICK_S if busy else self.settings.gateway.health_interval_s,
                )

    async def _tick(self) -> None:
        now = time.time()
        try:
            if self.catalog.refresh():
                log.info("catalog changed; %d models now", len(self.catalog))
        except ApplianceError as exc:  # a broken edit: keep serving the catalog we have
            log.warning("catalog not reloaded: %s", exc)
        instances = self.registry.instances()
        # Anything but serving or asleep is on its way somewhere: follow its job closely.
        busy = any(i.state not in (InstanceState.READY, InstanceState.PARKED) for i in instances)
        gw = self.settings.gateway
        interval = gw.job_poll_interval_s
        if any(i.preemptible for i in instances):
            # A preemption is only seen in the job list: look often enough to use the grace time.
            interval = min(interval, gw.preemption_poll_interval_s)
        if busy or now - self._last_job_poll >= interval:
            await self.poll_jobs()
        await asyncio.gather(*(self._check(i) for i in self.registry.instances()))
        await self.lifecycle.settle(now)
        self.registry.notify()

    async def poll_jobs(self) -> None:
        """Bring the instances in line with Slurm's job list: adopt, start, forget, drain."""
        polled_at = time.time()
        jobs = await self.access.jobs()
        self._last_job_poll = time.time()
        by_id: dict[int, SlurmJob] = {j.job_id: j for j in jobs}
        for job in jobs:
            model = model_from_job_name(self.settings, job.name)
            if self.registry.get(job.job_id) is None and job.active and model in self.catalog:
                # Left by an earlier gateway: adopt rather than orphan it.
                log.info("adopting instance job %s of %s", job.job_id, model)
                self.registry.add(
                    Instance(
                        job_id=job.job_id,
                        model=model,
                        state=InstanceState.PENDING,
                        submitted_at=job.submit_time or time.time(),
                        preemptible=bool(job.partition)
                        and job.partition == self.settings.cluster.preemptible_partition,
                    )
                )
        for inst in self.registry.instances():
            job = by_id.get(inst.job_id)
            if job is None and inst.submitted_at >= polled_at:
                continue  # submitted while squeue ran: the snapshot predates it
            if job is None or not job.active:
                self._forget(inst, job)
                continue
            if job.state == "PENDING":
                inst.reason = job.reason
                inst.required_nodes = tuple(job.required_nodes)
            elif inst.state is InstanceState.PENDING:
                inst.state = InstanceState.STARTING
                inst.reason = ""
                inst.node = job.node
            if job.state == "RUNNING" and not job.preempt_time:
                inst.ends_at = job.end_time
            if job.preempt_time and inst.state is not InstanceState.DRAINING:
                await self.lifecycle.drain(inst, "preempted by a batch job", job.grace_end)
            elif job.node_drained and inst.state is not InstanceState.DRAINING:
                await self.lifecycle.drain(inst, f"node {job.node} is drained")

    def _forget(self, inst: Instance, job: SlurmJob | None) -> None:
        """The job has ended: drop the instance; record why, if it never became ready."""
        if inst.state in (InstanceState.PENDING, InstanceState.STARTING):
            state = job.state if job else "ended"
            tail = self.access.failure_detail(inst)
            message = f"instance job {inst.job_id} {state.lower()} before it was ready" + (
                f"; last log lines:\n{tail}" if tail else ""
            )
            self.registry.failures.record(inst.model, message, time.time())
            log.warning("%s", message)
        inst.state = InstanceState.GONE
        self.registry.remove(inst)

    async def _check(self, inst: Instance) -> None:
        now = time.time()
        if inst.state is InstanceState.STARTING:
            await self._check_starting(inst, now)
        elif inst.state in (InstanceState.READY, InstanceState.UNHEALTHY):
            await self._check_serving(inst, now)

    async def _check_starting(self, inst: Instance, now: float) -> None:
        try:
            address = await self.access.address(inst)
        except PlainHttpRefused as exc:
            log.error("%s", exc)
            self.registry.failures.record(inst.model, str(exc), now)
            await self.lifecycle.retire(inst, "plain HTTP to another host")
            return
        if address is None:
            return
        inst.phases = dict(address.phases)
        inst.url = address.url
        inst.can_sleep = address.can_sleep
        if not await self.access.healthy(inst):
            started = address.phases.get("job_started_at", inst.submitted_at)
            if now - started > self.settings.gateway.start_timeout_s:
                await self.lifecycle.retire(inst, "did not become healthy in time")
            return
        inst.state = InstanceState.READY
        inst.ready_at = now
        # The launcher records readiness itself (its probe runs every 0.1 s); if the gateway
        # saw it first, its own observation stands in, one tick late at most.
        latest = await self.access.address(inst) or address
        inst.phases = {**latest.phases}
        inst.phases.setdefault("weights_loaded_at", now)
        inst.phases.setdefault("ready_at", now)
        inst.last_used = now
        inst.health_failures = 0
        self.registry.failures.clear(inst.model)
        log.info("instance %s of %s ready at %s", inst.job_id, inst.model, inst.url)

    async def _check_serving(self, inst: Instance, now: float) -> None:
        due = inst.state is InstanceState.UNHEALTHY or (
            now - inst.last_probe >= self.settings.gateway.health_interval_s
        )
        if not due:
            return
        previous_probe, inst.last_probe = inst.last_probe, now
        if await self.access.healthy(inst) or (
            inst.state is InstanceState.READY and inst.last_data >= previous_probe
        ):
            if inst.state is InstanceState.UNHEALTHY:
                log.info("instance %s of %s recovered", inst.job_id, inst.model)
            inst.state = InstanceState.READY
            inst.health_failures = 0
            inst.reason = ""
            return
        inst.health_failures += 1
        if inst.state is InstanceState.READY and inst.health_failures >= UNHEALTHY_AFTER:
            inst.state = InstanceState.UNHEALTHY
            inst.reason = "failing health checks"
            inst.phases["unhealthy_since"] = now
        elif inst.state is InstanceState.UNHEALTHY:
            since = inst.phases.setdefault("unhealthy_since", now)
            if now - since > UNHEALTHY_GRACE_S:
                await self.lifecycle.retire(inst, "unhealthy for too long")
