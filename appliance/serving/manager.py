"""Keeps each model's instances: launches Slurm jobs, follows their state, checks health,
routes requests to the least-loaded one, scales up on queue depth and retires idle ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import Catalog
from appliance.serving.access import ClusterAccess, InstanceJob
from appliance.serving.instance import ACTIVE_STATES, Instance, InstanceState
from appliance.serving.rebalance import Rebalancer

log = logging.getLogger(__name__)

# Consecutive failed health checks before a ready instance stops getting requests.
UNHEALTHY_AFTER = 2
# An unhealthy instance that does not recover within this many seconds is cancelled.
UNHEALTHY_GRACE_S = 30.0
# After this many consecutive start failures of a model, requests fail fast for a while
# instead of each launching another job that will fail the same way.
START_FAILURES_BEFORE_COOLDOWN = 3
START_FAILURE_COOLDOWN_S = 60.0
# Polling period while something is being started or stopped (cold starts wait on it).
FAST_TICK_S = 0.25


class InstanceStartError(ApplianceError):
    """A model's instance could not be started; the message quotes the job's log."""


class InstanceWaitTimeout(ApplianceError):
    """No instance of the model became ready within the configured time."""


class InstanceManager:
    """Owns the instances of every model; one per gateway process."""

    def __init__(
        self,
        settings: ApplianceSettings,
        catalog: Catalog,
        access: ClusterAccess,
    ):
        self.settings = settings
        self.catalog = catalog
        self.access = access
        self._instances: dict[int, Instance] = {}
        # Set (and replaced) whenever instances change; waiters keep the one they saw. An Event
        # rather than a Condition: Python 3.11's Condition.wait, cancelled by wait_for's timeout
        # under load, can leave its lock released and the waiter fails on exit.
        self._changed = asyncio.Event()
        self._launch_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._start_failures: dict[str, deque[float]] = {}
        self._last_error: dict[str, str] = {}
        self._last_job_poll = 0.0
        # Models with a scale-up launch under way (at most one each), and its tasks.
        self._scaling: set[str] = set()
        self._background: set[asyncio.Task] = set()
        self._rebalancer = Rebalancer(self)

    # ----- lifecycle of the manager -------------------------------------------------------

    async def start(self) -> None:
        """Learn the cluster, adopt instances left by an earlier gateway, start the loop."""
        await self.access.start()
        await self._poll_jobs()
        self._task = asyncio.create_task(self._run(), name="instance-manager")

    async def close(self, stop_instances: bool = False) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if stop_instances:
            for inst in list(self._instances.values()):
                await self.access.cancel(inst.job_id)
        await self.access.close()

    # ----- queries ------------------------------------------------------------------------

    def instances(self, model: str | None = None) -> list[Instance]:
        return [i for i in self._instances.values() if model is None or i.model == model]

    def get(self, job_id: int) -> Instance | None:
        return self._instances.get(job_id)

    def model_state(self, model: str) -> str:
        """`running` if any instance is ready, `starting` if one is on its way, else `stopped`."""
        states = {i.state for i in self.instances(model)}
        if InstanceState.READY in states:
            return "running"
        if states & {InstanceState.PENDING, InstanceState.STARTING}:
            return "starting"
        return "stopped"

    # ----- launching and stopping ---------------------------------------------------------

    def changed(self) -> asyncio.Event:
        """Set at the next change of any instance (a new one ready, one draining, ...)."""
        return self._changed

    def _preemptible(self, model: str) -> bool:
        """Whether the next instance of `model` goes to the preemptible partition: only above
        its min_instances pinned ones, and only where the model and the cluster allow it."""
        spec = self.catalog.get(model)
        if spec is None or not self.settings.cluster.preemptible_partition:
            return False
        allowed = (
            spec.preemptible
            if spec.preemptible is not None
            else (self.settings.serving.preemptible)
        )
        pinned = [
            i for i in self.instances(model) if i.state in ACTIVE_STATES and not i.preemptible
        ]
        return allowed and len(pinned) >= spec.min_instances

    async def launch(self, model: str, avoid: frozenset[str] = frozenset()) -> Instance:
        """Submit one instance job for `model` (does not wait for it to become ready), on none
        of the nodes in `avoid`."""
        spec = self.catalog.get(model)
        if spec is None:
            raise ApplianceError(f"unknown model {model!r}")
        if spec.base_model:
            raise ApplianceError(f"{model} is a LoRA adapter: it runs on {spec.base_model}")
        active = [i for i in self.instances(model) if i.state in ACTIVE_STATES]
        if len(active) >= spec.max_instances:
            raise ApplianceError(
                f"model {model} already has {len(active)} instance(s); its max_instances is "
                f"{spec.max_instances}"
            )
        submitted_at = time.time()
        preemptible = self._preemptible(model)
        job_id = await self.access.submit(spec, preemptible, avoid)
        inst = Instance(
            job_id=job_id,
            model=model,
            state=InstanceState.PENDING,
            submitted_at=submitted_at,
            preemptible=preemptible,
        )
        self._instances[job_id] = inst
        kind = "preemptible instance" if preemptible else "instance"
        log.info("launched %s job %s for %s", kind, job_id, model)
        await self._notify()
        return inst

    async def retire(self, inst: Instance, reason: str) -> None:
        """Cancel an instance's job; it stops receiving requests at once."""
        if inst.state in (InstanceState.STOPPING, InstanceState.GONE):
            return
        log.info("stopping instance %s of %s: %s", inst.job_id, inst.model, reason)
        before = (inst.state, inst.reason)
        inst.state = InstanceState.STOPPING
        inst.reason = reason
        try:
            await self.access.cancel(inst.job_id)
        except ApplianceError:
            inst.state, inst.reason = before  # still running: keep it in the books as it was
            raise
        await self._notify()

    async def drain(self, inst: Instance, reason: str, leave_by: float | None = None) -> None:
        """Take `inst` out of routing and move its running requests elsewhere; it is stopped
        once they have moved (or at `leave_by`). An instance not serving yet just stops."""
        if inst.state in (InstanceState.PENDING, InstanceState.STARTING):
            await self.retire(inst, reason)
            return
        if inst.state not in (InstanceState.READY, InstanceState.UNHEALTHY):
            return
        now = time.time()
        log.info("draining instance %s of %s (%d in flight): %s", inst.job_id, inst.model,
                 inst.inflight, reason)  # fmt: skip
        inst.state = InstanceState.DRAINING
        inst.reason = reason
        inst.leave_by = leave_by or now + self.settings.gateway.drain_timeout_s
        inst.phases["draining_at"] = now
        inst.move_quota = inst.inflight
        others = [
            i
            for i in self.instances(inst.model)
            if i.state in ACTIVE_STATES and i.node != inst.node
        ]
        if inst.inflight and not others:
            # Nowhere to move to: start an instance now (placement by start-up time picks the
            # node where it loads fastest); the requests keep running here until it is ready.
            try:
                async with self._launch_lock:
                    await self.launch(inst.model, avoid=frozenset({inst.node} - {""}))
            except ApplianceError as exc:
                log.warning("no replacement for draining instance %s: %s", inst.job_id, exc)
        await self._notify()
        self._wake.set()

    def should_move(self, inst: Instance, record) -> bool:
        """Whether a resumable stream (`record`) on `inst` should move to another instance now."""
        if inst.state is InstanceState.DRAINING:
            return True
        if inst.move_quota <= 0:
            return False
        if inst.move_forced:
            return True
        spec = self.catalog.get(inst.model)
        max_len = spec.max_model_len if spec else 0
        return record.worth_moving(max_len, self.settings.gateway.rebalance_prefill_speedup)

    def moved(self, inst: Instance) -> None:
        """One stream has left `inst` for another instance."""
        inst.move_quota = max(0, inst.move_quota - 1)
        if not inst.move_quota:
            inst.move_forced = False

    def request_moves(self, inst: Instance, count: int, forced: bool = False) -> None:
        """Ask `count` of the streams on `inst` to move to other instances (`forced`: an
        administrator asked, no cost check)."""
        inst.move_quota = count
        inst.move_forced = forced

    async def _finish_draining(self, now: float) -> None:
        for inst in self.instances():
            if inst.state is not InstanceState.DRAINING:
                continue
            if inst.inflight == 0:
                await self.retire(inst, f"{inst.reason}; its requests have moved")
            elif inst.leave_by is not None and now >= inst.leave_by:
                await self.retire(inst, f"{inst.reason}; out of time with {inst.inflight} "
                                  "request(s) still running")  # fmt: skip

    # ----- routing ------------------------------------------------------------------------

    def _pick(self, model: str, exclude: set[int]) -> Instance | None:
        ready = [i for i in self.instances(model) if i.routable and i.job_id not in exclude]
        if not ready:
            return None
        # Least outstanding requests; among equals the one idle longest spreads load evenly.
        return min(ready, key=lambda i: (i.inflight, i.last_used))

    def try_acquire(self, model: str, exclude: set[int] | None = None) -> Instance | None:
        """A ready instance with its in-flight count taken, or None (never waits)."""
        inst = self._pick(model, exclude or set())
        if inst is not None:
            inst.inflight += 1
            inst.last_used = inst.last_acquired = time.time()
            self._maybe_scale_up(model)
        return inst

    async def acquire(
        self, model: str, timeout: float, exclude: set[int] | None = None
    ) -> Instance:
        """A ready instance of `model`, starting one when none is up (scale from zero)."""
        exclude = exclude or set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen_failures = len(self._recent_failures(model))
        while True:
            changed = self._changed  # before looking: a change after the look wakes us
            inst = self.try_acquire(model, exclude)
            if inst is not None:
                return inst
            failures = self._recent_failures(model)
            if len(failures) >= START_FAILURES_BEFORE_COOLDOWN or (
                len(failures) - seen_failures > self.settings.gateway.max_retries
            ):
                raise InstanceStartError(
                    f"model {model} failed to start: {self._last_error.get(model, 'unknown')}"
                )
            await self._ensure_starting(model, exclude)
            remaining = deadline - loop.time()
            if remaining <= 0:
                waiting = [i for i in self.instances(model) if i.state in ACTIVE_STATES]
                detail = "; ".join(
                    f"job {i.job_id} {i.state.value} {i.reason}".strip() for i in waiting
                )
                raise InstanceWaitTimeout(
                    f"no instance of {model} became ready within {timeout:g} s"
                    + (f" ({detail})" if detail else "")
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))

    async def warm(self, model: str) -> None:
        """Start an instance of `model` unless one is ready or on its way (what a first request
        would do, without waiting for it)."""
        if self.model_state(model) == "stopped":
            await self._ensure_starting(model, set())

    async def _ensure_starting(self, model: str, exclude: set[int]) -> None:
        # One launch at a time, so concurrent first requests share one new instance.
        async with self._launch_lock:
            coming = [
                i
                for i in self.instances(model)
                if i.state in (InstanceState.PENDING, InstanceState.STARTING)
                and i.job_id not in exclude
            ]
            spec = self.catalog.get(model)
            active = [i for i in self.instances(model) if i.state in ACTIVE_STATES]
            if not coming and spec is not None and len(active) < spec.max_instances:
                await self.launch(model)
            elif (
                not coming
                and active
                and not any(i.routable for i in active if i.job_id not in exclude)
            ):
                # At max_instances but none usable: replace the worst one.
                await self.retire(max(active, key=lambda i: i.health_failures), "replaced")
                await self.launch(model)

    def release(self, inst: Instance, failed: bool = False) -> None:
        """Give back an instance taken by acquire; `failed` means it broke mid-request."""
        inst.inflight = max(0, inst.inflight - 1)
        inst.last_used = time.time()
        inst.served += 1
        if failed and inst.state is InstanceState.READY:
            # Stop routing to it until a health check says otherwise.
            inst.state = InstanceState.UNHEALTHY
            inst.health_failures = max(inst.health_failures, UNHEALTHY_AFTER)
            inst.reason = "request failed"
            self._wake.set()

    def _maybe_scale_up(self, model: str) -> None:
        spec = self.catalog.get(model)
        if spec is None:
            return
        insts = self.instances(model)
        ready = [i for i in insts if i.routable]
        coming = [i for i in insts if i.state in (InstanceState.PENDING, InstanceState.STARTING)]
        active = len(ready) + len(coming)
        if not ready or coming or active >= spec.max_instances:
            return
        depth = sum(i.inflight for i in ready) / len(ready)
        if depth >= self.settings.gateway.scale_up_queue_depth and model not in self._scaling:
            # Marked before the task runs, so a burst of requests launches one instance, not one
            # each; the next scale-up waits until this one is at least queued in Slurm.
            self._scaling.add(model)
            log.info("scaling up %s: %.1f requests in flight per instance", model, depth)
            task = asyncio.get_running_loop().create_task(self._scale_up(model))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _scale_up(self, model: str) -> None:
        try:
            async with self._launch_lock:
                await self.launch(model)
        except ApplianceError as exc:
            log.warning("could not scale up %s: %s", model, exc)
        finally:
            self._scaling.discard(model)

    # ----- the loop -----------------------------------------------------------------------

    async def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving: one bad tick must not stop health checking
                log.exception("instance manager tick failed")
            busy = any(
                i.state
                in (
                    InstanceState.PENDING,
                    InstanceState.STARTING,
                    InstanceState.STOPPING,
                    InstanceState.DRAINING,
                )
                for i in self._instances.values()
            )
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
        busy = any(i.state is not InstanceState.READY for i in self._instances.values())
        gw = self.settings.gateway
        interval = gw.job_poll_interval_s
        if any(i.preemptible for i in self._instances.values()):
            # A preemption is only seen in the job list: look often enough to use the grace time.
            interval = min(interval, gw.preemption_poll_interval_s)
        if busy or now - self._last_job_poll >= interval:
            await self._poll_jobs()
        await asyncio.gather(*(self._check(i) for i in list(self._instances.values())))
        await self._finish_draining(now)
        await self._rebalancer.tick(now)
        await self._autoscale()
        await self._notify()

    async def _poll_jobs(self) -> None:
        polled_at = time.time()
        jobs = await self.access.jobs()
        self._last_job_poll = time.time()
        by_id: dict[int, InstanceJob] = {j.job_id: j for j in jobs}
        for job in jobs:
            if job.job_id not in self._instances and job.active and job.model in self.catalog:
                # Left by an earlier gateway: adopt rather than orphan it.
                log.info("adopting instance job %s of %s", job.job_id, job.model)
                self._instances[job.job_id] = Instance(
                    job_id=job.job_id,
                    model=job.model,
                    state=InstanceState.PENDING,
                    submitted_at=job.submit_time or time.time(),
                    preemptible=bool(job.partition)
                    and job.partition == self.settings.cluster.preemptible_partition,
                )
        for inst in list(self._instances.values()):
            job = by_id.get(inst.job_id)
            if job is None and inst.submitted_at >= polled_at:
                continue  # submitted while squeue ran: the snapshot predates it
            if job is None or not job.active:
                self._forget(inst, job)
                continue
            if job.state == "PENDING":
                inst.reason = job.reason
            elif inst.state is InstanceState.PENDING:
                inst.state = InstanceState.STARTING
                inst.reason = ""
                inst.node = job.node
            if job.preempted_at and inst.state is not InstanceState.DRAINING:
                await self.drain(inst, "preempted by a batch job", job.leave_by)
            elif job.node_drained and inst.state is not InstanceState.DRAINING:
                await self.drain(inst, f"node {job.node} is drained")

    def _forget(self, inst: Instance, job: InstanceJob | None) -> None:
        """The job has ended: drop the instance; record why, if it never became ready."""
        if inst.state in (InstanceState.PENDING, InstanceState.STARTING):
            state = job.state if job else "ended"
            tail = self.access.failure_detail(inst)
            self._last_error[inst.model] = (
                f"instance job {inst.job_id} {state.lower()} before it was ready"
                + (f"; last log lines:\n{tail}" if tail else "")
            )
            self._start_failures.setdefault(inst.model, deque(maxlen=10)).append(time.time())
            log.warning("%s", self._last_error[inst.model])
        inst.state = InstanceState.GONE
        del self._instances[inst.job_id]

    def _recent_failures(self, model: str) -> list[float]:
        cutoff = time.time() - START_FAILURE_COOLDOWN_S
        return [t for t in self._start_failures.get(model, ()) if t >= cutoff]

    async def _check(self, inst: Instance) -> None:
        now = time.time()
        if inst.state is InstanceState.STARTING:
            address = await self.access.address(inst)
            if address is None:
                return
            inst.phases = dict(address.phases)
            inst.url = address.url
            if not await self.access.healthy(inst):
                started = address.phases.get("job_started_at", inst.submitted_at)
                if now - started > self.settings.gateway.start_timeout_s:
                    await self.retire(inst, "did not become healthy in time")
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
            self._start_failures.pop(inst.model, None)
            self._last_error.pop(inst.model, None)
            log.info("instance %s of %s ready at %s", inst.job_id, inst.model, inst.url)
        elif inst.state in (InstanceState.READY, InstanceState.UNHEALTHY):
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
                    await self.retire(inst, "unhealthy for too long")

    async def _autoscale(self) -> None:
        now = time.time()
        for spec in self.catalog:
            insts = self.instances(spec.name)
            active = [i for i in insts if i.state in ACTIVE_STATES]
            if len(active) < spec.min_instances and not self._recent_failures(spec.name):
                try:
                    async with self._launch_lock:
                        await self.launch(spec.name)
                except ApplianceError as exc:
                    log.warning("cannot keep %s at min_instances: %s", spec.name, exc)
                continue
            idle_limit = (
                spec.idle_timeout_s
                if spec.idle_timeout_s is not None
                else self.settings.gateway.idle_timeout_s
            )
            if idle_limit <= 0:
                continue
            keep = len(active)
            for inst in sorted(active, key=lambda i: i.last_used):
                if keep <= spec.min_instances:
                    break
                if inst.routable and inst.inflight == 0 and now - inst.last_used >= idle_limit:
                    await self.retire(inst, f"idle for {idle_limit:g} s")
                    keep -= 1
