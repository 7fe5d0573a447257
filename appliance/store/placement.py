"""Placement by start-up time: for each node, queue wait plus checkpoint size over the bandwidth
of the fastest tier that holds it there; the instance goes where its first token comes soonest."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp

from appliance.config import ApplianceSettings
from appliance.models.resources import InstanceRequest
from appliance.security.node_tls import PlainHttpRefused, check_transport
from appliance.slurm.client import SlurmClient
from appliance.slurm.records import SlurmNode
from appliance.store.inventory import NodeInventory

log = logging.getLogger(__name__)

# Used when a node did not measure a tier (GB/s); conservative for current servers.
DEFAULT_BANDWIDTH_GBPS = {"host": 20.0, "page_cache": 10.0, "disk": 1.0, "shared": 0.5}
# A node that cannot take the instance now: the wait is unknown, so it ranks after every node
# that can (a minute is longer than any load from a local tier).
BUSY_WAIT_S = 600.0


@dataclass(frozen=True)
class NodeEstimate:
    """Why a node ranks where it does."""

    node: str
    tier: str
    wait_s: float
    load_s: float

    @property
    def total_s(self) -> float:
        return self.wait_s + self.load_s

    def describe(self) -> str:
        wait = "now" if self.wait_s == 0 else f"after ~{self.wait_s:.0f} s in the queue"
        return f"{self.node}: {self.load_s:.1f} s from {self.tier} ({wait})"


def _gres_count(gres: str, name: str) -> int:
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == name and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def fits_now(node: SlurmNode, request: InstanceRequest) -> bool:
    """Whether the node has the CPUs, memory and GPUs (or shards) free for the request."""
    if node.base_state not in ("idle", "mixed") or any(
        f in ("drain", "draining", "down", "fail") for f in node.flags
    ):
        return False
    if node.cpus - node.alloc_cpus < request.cpus:
        return False
    if node.real_memory_mb and node.real_memory_mb - node.alloc_memory_mb < request.mem_mb:
        return False
    if request.gres:
        name, _, count = request.gres.partition(":")
        need = int(count.split(":")[-1] or 1)
        if _gres_count(node.gres, name) - _gres_count(node.gres_used, name) < need:
            return False
    return True


def estimate(
    model_id: str, node: SlurmNode, inventory: NodeInventory, request: InstanceRequest
) -> NodeEstimate | None:
    """Seconds until the instance could have its weights on this node; None if it lacks them."""
    holding = inventory.holdings.get(model_id)
    if holding is None:
        return None
    bandwidth = inventory.bandwidth_gbps.get(holding.tier) or DEFAULT_BANDWIDTH_GBPS.get(
        holding.tier, 1.0
    )
    load_s = holding.nbytes / (bandwidth * 1e9)
    wait_s = 0.0 if fits_now(node, request) else BUSY_WAIT_S
    return NodeEstimate(node.name, holding.tier, wait_s, load_s)


def choose_node(
    model_id: str,
    nodes: list[SlurmNode],
    inventories: dict[str, NodeInventory],
    request: InstanceRequest,
) -> tuple[str | None, list[NodeEstimate]]:
    """The node to pin the instance to, and the ranking behind it. None (let Slurm choose) when
    no node reported holding the model, or when none can take it now."""
    ranked = sorted(
        (
            e
            for n in nodes
            if n.name in inventories
            for e in [estimate(model_id, n, inventories[n.name], request)]
            if e is not None
        ),
        key=lambda e: e.total_s,
    )
    if not ranked or ranked[0].wait_s > 0:
        return None, ranked
    return ranked[0].node, ranked


async def fetch_inventories(
    session: aiohttp.ClientSession, urls: dict[str, str], timeout_s: float = 2.0
) -> dict[str, NodeInventory]:
    """Each node's inventory from its store service; nodes that do not answer are left out."""

    async def one(node: str, url: str) -> tuple[str, NodeInventory | None]:
        try:
            async with session.get(
                url.rstrip("/") + "/inventory", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                if resp.status != 200:
                    return node, None
                return node, NodeInventory.from_dict(await resp.json())
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            return node, None

    results = await asyncio.gather(*(one(n, u) for n, u in urls.items()))
    return {n: inv for n, inv in results if inv is not None}


def service_urls(settings: ApplianceSettings, nodes: list[SlurmNode]) -> dict[str, str]:
    """Where each node's store service listens (HTTPS with serving.tls); a node whose service
    would be asked in plain HTTP on another host, against serving.allow_plain_http, is left out."""
    port = settings.store.service_port
    scheme = "https" if settings.serving.tls else "http"
    urls = {}
    for n in nodes:
        url = settings.store.services.get(n.name) or f"{scheme}://{n.address or n.name}:{port}"
        try:
            check_transport(settings, url, f"the store service of node {n.name}")
        except PlainHttpRefused as exc:
            log.error("%s", exc)
            continue
        urls[n.name] = url
    return urls


async def place(
    settings: ApplianceSettings,
    slurm: SlurmClient,
    session: aiohttp.ClientSession,
    model_id: str,
    request: InstanceRequest,
    avoid: frozenset[str] = frozenset(),
) -> tuple[str | None, list[NodeEstimate]]:
    """Ask the nodes' store services what they hold and choose where to start the instance,
    on none of the nodes in `avoid` (where an instance of the model is being preempted)."""
    nodes = [n for n in await asyncio.to_thread(slurm.nodes) if n.name not in avoid]
    inventories = await fetch_inventories(session, service_urls(settings, nodes))
    return choose_node(model_id, nodes, inventories, request)
