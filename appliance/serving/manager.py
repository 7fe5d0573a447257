"""Coordinates a gateway's instances: launches, drains, parks, wakes and stops them, and wires
the registry, the router, the autoscaler and the health loop together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import Catalog, ModelSpec
from appliance.serving.access import ClusterAccess, UpstreamError
from appliance.serving.autoscaler import Autoscaler, InstanceLoad, ModelSnapshot, Park, Retire
from appliance.serving.eviction import EvictionPolicy, Holder, LeastRecentlyUsedIdle, RoomWanted
from appliance.serving.health_loop import HealthLoop
from appliance.serving.instance import ACTIVE_STATES, COMING_STATES, Instance, InstanceState
from appliance.serving.partition_choice import PartitionChoice, PinnedFirst
from appliance.serving.rebalance import Rebalancer
from appliance.serving.registry import START_FAILURES_BEFORE_COOLDOWN, InstanceRegistry
from appliance.serving.routing import POLICIES, Router, RoutingPolicy
from appliance.serving.time_limit import Ending, StartSuccessor, SuccessorAtTimeLimit
from appliance.serving.wait_queue import FairShare, Waiting, WaitQueueFull, WaitQueuePolicy

log = logging.getLogger(__name__)


class InstanceStartError(ApplianceError):
    """A model's instance could not be started; the message quotes the job's log."""


class InstanceWaitTimeout(ApplianceError):
    """No instance of the model became ready within the configured time."""


# Retry-After for a full wait queue when the model has not started here yet.
DEFAULT_RETRY_AFTER_S = 30


class InstanceManager:
    """Owns the instances of every model; one per gateway process."""

    def __init__(
        self,
        settings: ApplianceSettings,
        catalog: Catalog,
        access: ClusterAccess,
        routing: RoutingPolicy | None = None,
        partition: PartitionChoice | None = None,
        eviction: EvictionPolicy | None = None,
        wait_queue: WaitQueuePolicy | None = None,
    ):
        self.settings = settings
        self.catalog = catalog
        self.access = access
        self.registry = InstanceRegistry()
        self.router = Router(self.registry, routing or POLICIES[settings.gateway.routing]())
        self.partition = partition or PinnedFirst(settings, catalog)
        self.autoscaler = Autoscaler(settings.gateway.scale_up_queue_depth)
        self.health = HealthLoop(settings, catalog, access, self.registry, self)
        self._launch_lock = asyncio.Lock()
        # Models with a scale-up launch under way (at most one each), and its tasks.
        self._scaling: set[str] = set()
        self._background: set[asyncio.Task] = set()
        self._rebalancer = Rebalancer(self)
        self.eviction = eviction or LeastRecentlyUsedIdle()
        self.handover = SuccessorAtTimeLimit(settings.gateway.successor_lead_s)
        self.wait_queue = wait_queue or FairShare()
        # Requests waiting for an instance, per model and user; and for each pending job that
        # room was made for, the instance stopped for it (one at a time: the next once that one
        # is gone).
        self._waiting: dict[str, Counter[str]] = {}
        self._evicted_for: dict[int, int] = {}

    # ----- lifecycle of the manager -------------------------------------------------------

    async def start(self) -> None:
        """Learn the cluster, adopt instances left by an earlier gateway, start the loop."""
        await self.access.start()
        await self.health.start()

    async def close(self, stop_instances: bool = False) -> None:
        await self.health.stop()
        if stop_instances:
            for inst in self.registry.instances():
                await self.access.cancel(inst.job_id)
        await self.access.close()

    # ----- queries ------------------------------------------------------------------------

    def instances(self, model: str | None = None) -> list[Instance]:
        return self.registry.instances(model)

    def get(self, job_id: int) -> Instance | None:
        return self.registry.get(job_id)

    def model_state(self, model: str) -> str:
        """`running` if any instance is ready, `starting` if one is on its way, else `stopped`."""
        return self.registry.model_state(model)

    def changed(self) -> asyncio.Event:
        """Set at the next change of any instance (a new one ready, one draining, ...)."""
        return self.registry.changed()

    # ----- launching and stopping ---------------------------------------------------------

    async def launch(
        self, model: str, avoid: frozenset[str] = frozenset(), successor: bool = False
    ) -> Instance:
        """Submit one instance job for `model` (does not wait for it to become ready), on none
        of the nodes in `avoid`; a `successor` (of an instance at its time limit) may go one
        above max_instances until the other ends."""
        spec = self.catalog.get(model)
        if spec is None:
            raise ApplianceError(f"unknown model {model!r}")
        if spec.base_model:
            raise ApplianceError(f"{model} is a LoRA adapter: it runs on {spec.base_model}")
        active = [i for i in self.instances(model) if i.state in ACTIVE_STATES]
        if len(active) >= spec.max_instances + successor:
            raise ApplianceError(
                f"model {model} already has {len(active)} instance(s); its max_instances is "
                f"{spec.max_instances}"
            )
        submitted_at = time.time()
        preemptible = self.partition.preemptible(model, self.instances(model))
        job_id = await self.access.submit(spec, preemptible, avoid)
        inst = Instance(
            job_id=job_id,
            model=model,
            state=InstanceState.PENDING,
            submitted_at=submitted_at,
            preemptible=preemptible,
        )
        self.registry.add(inst)
        kind = "preemptible instance" if preemptible else "instance"
        log.info("launched %s job %s for %s", kind, job_id, model)
        self.registry.notify()
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
        self.registry.notify()

    async def park(self, inst: Instance, reason: str) -> None:
        """Put an idle instance to sleep: it frees its GPU memory and keeps its job, and the
        next request for its model wakes it (seconds, not a cold start)."""
        if inst.state is not InstanceState.READY or inst.inflight or not inst.can_sleep:
            return
        # Parked before the call: no request is routed to it while it falls asleep.
        inst.state = InstanceState.PARKED
        inst.reason = reason
        started = time.time()
        try:
            await self.access.sleep(inst)
        except (ApplianceError, UpstreamError) as exc:
            # Its server's state is unknown now: it goes, as an idle instance would later.
            log.warning("instance %s of %s could not be parked: %s", inst.job_id, inst.model, exc)
            await self.retire(inst, f"could not be parked: {exc}")
            return
        inst.phases["parked_at"] = time.time()
        log.info(
            "parked instance %s of %s in %.1f s: %s",
            inst.job_id,
            inst.model,
            time.time() - started,
            reason,
        )
        self.registry.notify()

    def _wake(self, inst: Instance) -> None:
        """Wake a parked instance for a waiting request (in the background: the request waits
        for the registry's next change, as for a start)."""
        inst.state = InstanceState.WAKING
        inst.reason = "woken for a request"
        inst.phases["waking_at"] = time.time()
        self._spawn(self._finish_waking(inst))
        self.registry.notify()

    async def _finish_waking(self, inst: Instance) -> None:
        try:
            await self.access.wake(inst)
        except (ApplianceError, UpstreamError) as exc:
            log.warning("instance %s of %s did not wake: %s", inst.job_id, inst.model, exc)
            self.registry.failures.record(
                inst.model, f"a parked instance did not wake: {exc}", time.time()
            )
            with contextlib.suppress(ApplianceError):
                await self.retire(inst, f"did not wake: {exc}")
            self.registry.notify()
            return
        if inst.state is not InstanceState.WAKING:
            return  # stopped or drained meanwhile
        now = time.time()
        inst.state = InstanceState.READY
        inst.reason = ""
        inst.last_used = now
        inst.phases["woken_at"] = now
        log.info(
            "woke instance %s of %s in %.1f s",
            inst.job_id,
            inst.model,
            now - inst.phases["waking_at"],
        )
        self.registry.notify()

    async def drain(self, inst: Instance, reason: str, leave_by: float | None = None) -> None:
        """Take `inst` out of routing and move its running requests elsewhere; it is stopped
        once they have moved (or at `leave_by`). An instance not serving yet (or asleep) just
        stops."""
        if inst.state in (
            InstanceState.PENDING,
            InstanceState.STARTING,
            InstanceState.PARKED,
            InstanceState.WAKING,
        ):
            await self.retire(inst, reason)
            return
        if inst.state not in (InstanceState.READY, InstanceState.UNHEALTHY):
            return
        now = time.time()
        log.info(
            "draining instance %s of %s (%d in flight): %s",
            inst.job_id,
            inst.model,
            inst.inflight,
            reason,
        )
        inst.state = InstanceState.DRAINING
        inst.reason = reason
        inst.leave_by = leave_by or now + self.settings.gateway.drain_timeout_s
        inst.phases["draining_at"] = now
        inst.move_quota = inst.inflight
        inst.moves_wanted.set()
        others = [
            i
            for i in self.instances(inst.model)
            if i.state in ACTIVE_STATES and (i.node != inst.node or i.job_id == inst.successor)
        ]
        if inst.inflight and not others:
            # Nowhere to move to: start an instance now (placement by start-up time picks the
            # node where it loads fastest); the requests keep running here until it is ready.
            try:
                async with self._launch_lock:
                    await self.launch(inst.model, avoid=frozenset({inst.node} - {""}))
            except ApplianceError as exc:
                log.warning("no replacement for draining instance %s: %s", inst.job_id, exc)
        self.registry.notify()
        self.health.wake()

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
            if inst.state is not InstanceState.DRAINING:
                inst.moves_wanted.clear()

    def request_moves(self, inst: Instance, count: int, forced: bool = False) -> None:
        """Ask `count` of the streams on `inst` to move to other instances (`forced`: an
        administrator asked, no cost check)."""
        inst.move_quota = count
        inst.move_forced = forced
        if count > 0:
            inst.moves_wanted.set()
        elif inst.state is not InstanceState.DRAINING:
            inst.moves_wanted.clear()

    async def _finish_draining(self, now: float) -> None:
        for inst in self.instances():
            if inst.state is not InstanceState.DRAINING:
                continue
            if inst.inflight == 0:
                await self.retire(inst, f"{inst.reason}; its requests have moved")
            elif inst.leave_by is not None and now >= inst.leave_by:
                left = f"out of time with {inst.inflight} request(s) still running"
                await self.retire(inst, f"{inst.reason}; {left}")

    # ----- routing ------------------------------------------------------------------------

    def try_acquire(
        self, model: str, exclude: set[int] | None = None, key: str | None = None
    ) -> Instance | None:
        """A ready instance with its in-flight count taken, or None (never waits); `key`: the
        request's prompt prefix, for the routing policy."""
        inst = self.router.take(model, exclude or set(), key)
        if inst is not None:
            self._maybe_scale_up(model)
        return inst

    async def acquire(
        self,
        model: str,
        timeout: float,
        exclude: set[int] | None = None,
        key: str | None = None,
        user: str = "",
    ) -> Instance:
        """A ready instance of `model`, starting one when none is up (scale from zero); `key`:
        the request's prompt prefix, for the routing policy; `user`: whose request waits."""
        exclude = exclude or set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        failures = self.registry.failures
        seen_failures = len(failures.recent(model, time.time()))
        inst = self.try_acquire(model, exclude, key)
        if inst is not None:
            return inst
        self.ensure_waiting_room(model, user)
        waiting = self._waiting.setdefault(model, Counter())
        waiting[user] += 1
        try:
            return await self._wait_for_instance(
                model, exclude, key, deadline, timeout, seen_failures
            )
        finally:
            waiting[user] -= 1
            if not +waiting:  # the last waiting request of the model
                self._waiting.pop(model, None)

    def ensure_waiting_room(self, model: str, user: str = "") -> None:
        """Raise WaitQueueFull when this user's request may not wait for an instance of `model`
        (the wait queue's policy); its Retry-After is how long the model's last start took."""
        by_user = +self._waiting.get(model, Counter())
        capacity = self.settings.gateway.max_waiting_requests
        refusal = self.wait_queue.refusal(Waiting(model, capacity, by_user), user)
        if refusal is None:
            return
        starts = [
            i.ready_at - i.submitted_at for i in self.instances(model) if i.ready_at is not None
        ]
        retry = round(max(starts)) if starts else DEFAULT_RETRY_AFTER_S
        raise WaitQueueFull(refusal, max(1, retry))

    async def _wait_for_instance(
        self,
        model: str,
        exclude: set[int],
        key: str | None,
        deadline: float,
        timeout: float,
        seen_failures: int,
    ) -> Instance:
        loop = asyncio.get_running_loop()
        failures = self.registry.failures
        while True:
            changed = self.registry.changed()  # before looking: a change after the look wakes us
            inst = self.try_acquire(model, exclude, key)
            if inst is not None:
                return inst
            recent = failures.recent(model, time.time())
            if len(recent) >= START_FAILURES_BEFORE_COOLDOWN or (
                len(recent) - seen_failures > self.settings.gateway.max_retries
            ):
                raise InstanceStartError(
                    f"model {model} failed to start: {failures.last_error(model)}"
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
        """Start (or wake) an instance of `model` unless one is ready or on its way (what a
        first request would do, without waiting for it)."""
        if self.model_state(model) in ("stopped", "parked"):
            await self._ensure_starting(model, set())

    async def _ensure_starting(self, model: str, exclude: set[int]) -> None:
        # One launch at a time, so concurrent first requests share one new instance.
        async with self._launch_lock:
            coming = [
                i
                for i in self.instances(model)
                if i.state in COMING_STATES and i.job_id not in exclude
            ]
            parked = [
                i
                for i in self.instances(model)
                if i.state is InstanceState.PARKED and i.job_id not in exclude
            ]
            if not coming and parked:
                # Waking takes seconds; a new instance, a cold start.
                self._wake(max(parked, key=lambda i: i.last_used))
                return
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
        self.router.release(inst)
        if failed and inst.state is InstanceState.READY:
            self.health.mark_failed(inst)

    # ----- autoscaling --------------------------------------------------------------------

    def _snapshot(self, spec: ModelSpec, now: float) -> ModelSnapshot:
        """What the autoscaler decides `spec`'s instances from."""
        idle_limit = (
            spec.idle_timeout_s
            if spec.idle_timeout_s is not None
            else self.settings.gateway.idle_timeout_s
        )
        return ModelSnapshot(
            model=spec.name,
            now=now,
            instances=tuple(InstanceLoad.of(i) for i in self.instances(spec.name)),
            min_instances=spec.min_instances,
            max_instances=spec.max_instances,
            idle_limit_s=idle_limit,
            recent_failures=len(self.registry.failures.recent(spec.name, now)),
            scaling_up=spec.name in self._scaling,
            park_after_s=self.settings.gateway.park_after_s,
        )

    def _maybe_scale_up(self, model: str) -> None:
        spec = self.catalog.get(model)
        if spec is None:
            return
        launch = self.autoscaler.scale_up(self._snapshot(spec, time.time()))
        if launch is None:
            return
        # Marked before the task runs, so a burst of requests launches one instance, not one
        # each; the next scale-up waits until this one is at least queued in Slurm.
        self._scaling.add(model)
        log.info("scaling up %s: %s", model, launch.reason)
        self._spawn(self._scale_up(model))

    def _spawn(self, coro) -> None:
        """Run `coro` in the background, holding a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
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

    async def settle(self, now: float) -> None:
        """The end of each health-loop tick: finish drains, rebalance, make room for waiting
        models, autoscale."""
        await self._finish_draining(now)
        await self._rebalancer.tick(now)
        if self.settings.gateway.evict_for_waiting:
            await self._make_room()
        await self._hand_over(now)
        await self._autoscale()

    async def _hand_over(self, now: float) -> None:
        """Instances near their job's time limit: start successors, hand over to ready ones."""
        snapshot = []
        for inst in self.instances():
            after = self.registry.get(inst.successor) if inst.successor else None
            snapshot.append(
                Ending(inst.job_id, inst.state, inst.ends_at, after.state if after else None)
            )
        for step in self.handover.steps(now, snapshot):
            inst = self.registry.get(step.job_id)
            assert inst is not None  # in the snapshot just taken
            left = f"its job ends at its time limit in {inst.ends_at - now:.0f} s"
            if isinstance(step, StartSuccessor):
                try:
                    async with self._launch_lock:
                        after = await self.launch(inst.model, successor=True)
                except ApplianceError as exc:
                    log.warning("no successor for instance %s: %s", inst.job_id, exc)
                    continue
                inst.successor = after.job_id
                log.info(
                    "instance %s of %s: %s; successor %s",
                    inst.job_id,
                    inst.model,
                    left,
                    after.job_id,
                )
            else:
                await self.drain(inst, f"handing over to {inst.successor}: {left}", inst.ends_at)

    def _holders(self) -> list[Holder]:
        """Every instance as eviction sees it; a model's most recently used min_instances are
        protected."""
        holders = []
        for spec in self.catalog:
            mine = sorted(
                (i for i in self.instances(spec.name) if i.state in ACTIVE_STATES),
                key=lambda i: i.last_used,
                reverse=True,
            )
            for rank, inst in enumerate(mine):
                holders.append(
                    Holder(
                        inst.job_id,
                        inst.model,
                        inst.state,
                        inst.inflight,
                        inst.last_used,
                        spec.resources.gpus > 0,
                        protected=rank < spec.min_instances,
                        node=inst.node,
                    )
                )
        return holders

    async def _make_room(self) -> None:
        """Stop one idle instance of another model for each model whose job is pending on
        resources while requests wait for it (the next only once that one is gone)."""
        live = {i.job_id for i in self.instances()}
        self._evicted_for = {
            job: victim for job, victim in self._evicted_for.items() if job in live
        }
        for model, by_user in list(self._waiting.items()):
            waiting = by_user.total()
            spec = self.catalog.get(model)
            pending = [
                i
                for i in self.instances(model)
                if i.state is InstanceState.PENDING and i.reason == "Resources"
            ]
            if spec is None or not pending:
                continue
            job = pending[0]
            if self._evicted_for.get(job.job_id) in live:
                continue  # the last one stopped for it is still going
            # A pinned job (a stored model's, on the node the store placed it) can only use
            # room made on its nodes: the policy looks for a victim there only.
            wanted = RoomWanted(
                model, job.job_id, spec.resources.gpus > 0, waiting, frozenset(job.required_nodes)
            )
            holder = self.eviction.victim(wanted, self._holders())
            if holder is None:
                continue
            victim = self.registry.get(holder.job_id)
            assert victim is not None  # in the snapshot just taken
            reason = (
                f"evicted for {model}: {waiting} request(s) waiting, its job {job.job_id} "
                f"pending on Resources; idle for {time.time() - victim.last_used:.0f} s"
            )
            log.warning("stopping instance %s of %s: %s", victim.job_id, victim.model, reason)
            self._evicted_for[job.job_id] = victim.job_id
            await self.retire(victim, reason)

    async def _autoscale(self) -> None:
        now = time.time()
        for spec in self.catalog:
            # Asked again after each step: a retirement changes what the next one sees.
            while (step := self.autoscaler.next_step(self._snapshot(spec, now))) is not None:
                if isinstance(step, Retire | Park):
                    inst = self.registry.get(step.job_id)
                    assert inst is not None  # in the snapshot just taken, nothing awaited since
                    if isinstance(step, Retire):
                        await self.retire(inst, step.reason)
                    else:
                        await self.park(inst, step.reason)
                        if inst.state is InstanceState.READY:
                            break  # a request took it meanwhile: decide again next tick
                    continue
                try:
                    async with self._launch_lock:
                        await self.launch(spec.name)
                except ApplianceError as exc:
                    log.warning("cannot keep %s at min_instances: %s", spec.name, exc)
                break
