"""One instance job's batch script: resources from the catalog and the cluster's GPUs, the node
from the model store's placement by start-up time. Shared by the gateway's direct access and the
circuit breaker, so an instance starts the same way whichever way the gateway reaches Slurm."""

from __future__ import annotations

import logging

import aiohttp

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import ModelSpec
from appliance.models.resources import InstanceRequest, plan_request
from appliance.serving.sbatch import render_instance_script
from appliance.slurm.client import SlurmClient
from appliance.store.placement import place

log = logging.getLogger(__name__)


class ModelNotInstalled(ApplianceError):
    """A catalog model whose files are not on this appliance."""


async def instance_script(
    settings: ApplianceSettings,
    slurm: SlurmClient,
    probe: aiohttp.ClientSession,
    spec: ModelSpec,
    cluster_gpus: int,
    *,
    preemptible: bool = False,
    avoid: frozenset[str] = frozenset(),
) -> str:
    """The batch script of one instance of `spec`, in the preemptible partition if
    `preemptible`, on none of the nodes in `avoid`; creates the directories the job writes to."""
    if not spec.installed(settings):
        raise ModelNotInstalled(
            f"model {spec.name} is not installed on this appliance "
            f"(expected files in {spec.model_dir(settings)})"
        )
    request = plan_request(spec, settings, cluster_gpus)
    node = None
    if spec.source_kind == "store":
        node = await _place(settings, slurm, probe, spec.name, request, avoid)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    settings.instances_dir.mkdir(parents=True, exist_ok=True)
    log.info("instance of %s: %s", spec.name, request)
    return render_instance_script(
        settings,
        spec,
        request,
        spec.model_dir(settings),
        nodelist=node,
        preemptible=preemptible,
        exclude=avoid,
    )


async def _place(
    settings: ApplianceSettings,
    slurm: SlurmClient,
    probe: aiohttp.ClientSession,
    model: str,
    request: InstanceRequest,
    avoid: frozenset[str],
) -> str | None:
    """The node where a stored model's instance starts soonest, or None for Slurm's choice."""

    try:
        node, ranking = await place(settings, slurm, probe, model, request, avoid)
    except ApplianceError as exc:
        log.warning("placement of %s skipped: %s", model, exc)
        return None
    if ranking:
        log.info(
            "placing %s on %s; estimates: %s",
            model,
            node or "any node (Slurm decides)",
            "; ".join(e.describe() for e in ranking),
        )
    return node
