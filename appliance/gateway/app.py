"""Builds the gateway's FastAPI app and wires the catalog, Slurm client and instance manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from dataclasses import dataclass

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance import __version__
from appliance.config import ApplianceSettings
from appliance.errors import disk_full
from appliance.gateway import account, admin_accounts, fine_tuning, monitoring_api
from appliance.gateway.auth import Authenticator, administrator
from appliance.gateway.body_limit import BodyLimit
from appliance.gateway.forward import Forwarder
from appliance.gateway.knowledge import KnowledgeService
from appliance.gateway.knowledge import router as knowledge_router
from appliance.gateway.oidc_bearer import OidcBearer
from appliance.gateway.protocol import RequestError, storage_full
from appliance.gateway.refusals import Refusals, note
from appliance.gateway.routes import admin_api, api, router
from appliance.models.catalog import Catalog, load_catalog
from appliance.monitoring.history import History
from appliance.monitoring.monitor import Monitor
from appliance.monitoring.requests import RequestMetrics
from appliance.monitoring.sources import gateway_sources
from appliance.monitoring.vllm_metrics import Target
from appliance.security import node_tls
from appliance.security.audit import AuditLog, audit_log
from appliance.security.quotas import Quotas
from appliance.serving.access import cluster_access
from appliance.serving.manager import InstanceManager
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner

log = logging.getLogger(__name__)
# How often counted refusals of the closed minute are written to the audit log.
REFUSALS_FLUSH_S = 5.0


@dataclass
class GatewayState:
    """What the routes need, attached to app.state.gateway."""

    settings: ApplianceSettings
    catalog: Catalog
    manager: InstanceManager
    forwarder: Forwarder
    auth: Authenticator
    knowledge: KnowledgeService
    requests: RequestMetrics
    monitor: Monitor | None
    audit: AuditLog
    quotas: Quotas
    slurm: SlurmClient
    refusals: Refusals


def _monitor(
    settings: ApplianceSettings,
    slurm: SlurmClient,
    manager: InstanceManager,
    requests: RequestMetrics,
) -> Monitor | None:
    """The collectors, started on their own thread (Slurm and scrapes block; the loop must not)."""

    mon = settings.monitoring
    if not mon.enabled:
        return None

    def targets() -> list[Target]:
        return [
            Target(i.job_id, i.model, i.node or "", i.url)
            for i in list(manager.instances())
            if i.routable and i.url and i.url.startswith("http")
        ]

    sources = gateway_sources(settings, slurm, targets, node_tls.verify(settings))
    monitor = Monitor(
        sources,
        History(mon.history_points, mon.history_max_series),
        live=[requests.collect],
        tick_s=mon.interval_s,
        history_step_s=mon.history_step_s,
    )
    monitor.start()
    return monitor


async def _flush_refusals(refusals: Refusals) -> None:
    """Write each minute's counted refusals soon after the minute ends."""
    while True:
        await asyncio.sleep(REFUSALS_FLUSH_S)
        await asyncio.to_thread(refusals.flush)


def create_app(
    settings: ApplianceSettings,
    catalog: Catalog | None = None,
    slurm: SlurmClient | None = None,
) -> FastAPI:
    """The gateway app; instances are managed for as long as the app runs."""
    catalog = catalog or load_catalog(settings)
    slurm = slurm or SlurmClient(LocalRunner(), settings.slurm_conf)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        gw_cfg = settings.gateway
        # aiohttp rather than httpx for the data path: its C HTTP parser costs ~0.2 ms a
        # request here against ~0.55 ms, which is most of the gateway's added latency.
        client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=gw_cfg.request_timeout_s, sock_connect=5.0),
            connector=aiohttp.TCPConnector(limit=2048, limit_per_host=0),
            auto_decompress=False,
        )
        # Before the first instance job: its launcher serves TLS with a certificate from it.
        node_tls.ensure_internal_ca(settings)
        manager = InstanceManager(settings, catalog, cluster_access(settings, slurm, client))
        await manager.start()
        requests = RequestMetrics()
        audit = audit_log(settings)
        auth = Authenticator(
            settings.api_keys_file, settings.users_file, settings.gateway, settings.identity
        )
        auth.audit = audit
        if "oidc" in settings.identity.sources:
            auth.oidc = OidcBearer(settings.identity)
        knowledge = KnowledgeService(settings)
        monitor = _monitor(settings, slurm, manager, requests)
        refusals = Refusals(audit)
        flusher = asyncio.create_task(_flush_refusals(refusals))
        app.state.gateway = GatewayState(
            settings,
            catalog,
            manager,
            Forwarder(settings, manager),
            auth,
            knowledge,
            requests,
            monitor,
            audit,
            Quotas(settings.security, path=settings.layout.usage_db),
            slurm,
            refusals,
        )
        log.info("gateway ready; %d models in the catalog", len(catalog))
        try:
            yield
        finally:
            flusher.cancel()
            await asyncio.to_thread(refusals.flush, True)  # the minute in progress too
            if monitor is not None:
                monitor.stop()
            await manager.close()
            await asyncio.to_thread(knowledge.close)
            if auth.oidc is not None:
                auth.oidc.close()
            await client.close()

    # No /docs, /redoc or /openapi.json: they would describe the API to anyone without a key,
    # and Swagger UI loads from a CDN an offline appliance cannot reach. Administrators get
    # the schema at /admin/openapi.json.
    app = FastAPI(
        title="appliance gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(BodyLimit, settings=settings, refused=note)
    parts = (
        router,
        api,
        admin_api,
        knowledge_router,
        account.sign_in_router,
        account.router,
        admin_accounts.router,
    )
    for part in (*parts, monitoring_api.router, fine_tuning.router):
        app.include_router(part)

    @app.get("/admin/openapi.json", dependencies=[Depends(administrator)], include_in_schema=False)
    async def openapi_schema() -> dict:
        return app.openapi()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return await request_error(request, RequestError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        note(request, exc)
        return exc.response()

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def storage_error(request: Request, exc: Exception):
        # A full disk refuses the write, which the stores undo (an atomic replace, a SQLite
        # transaction): the client is told, and nothing is lost. Anything else stays a 500.
        if not disk_full(exc):
            raise exc
        # Neither path nor file named: they may name a user's conversation or document.
        log.warning("a %s request was refused: the disk is full", request.method)
        return await request_error(request, storage_full())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        return RequestError(400, str(exc.errors())).response()

    return app
