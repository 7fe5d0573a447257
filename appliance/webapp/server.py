"""Serves the web app: a small FastAPI app with /health and the Gradio app mounted at /, offline
(no analytics, no CDN), with uploads in the appliance's own folder."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from appliance import envs
from appliance.config import ApplianceSettings
from appliance.security.secret_files import SecretFileError, read_secret_file, write_secret_file
from appliance.security.tls import ensure_certificate, server_options
from appliance.webapp.client import GatewayClient, GatewayError
from appliance.webapp.files_guard import guard_files
from appliance.webapp.oidc_sign_in import OidcSignIn

SECRET_BYTES = 32


def browser_secret(settings: ApplianceSettings) -> str:
    """The key that encrypts what browsers keep for the app; kept across restarts, so a restart
    does not sign everyone out or make their saved conversations unreadable."""
    path = settings.layout.browser_secret
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with contextlib.suppress(SecretFileError):  # another process wrote it just now
            write_secret_file(path, secrets.token_hex(SECRET_BYTES // 2).encode())
    return read_secret_file(path, size=SECRET_BYTES, what="web app secret").decode()


def prepare_environment(settings: ApplianceSettings) -> None:
    """Set, before gradio is imported, what keeps it offline and where it puts uploads."""
    uploads = settings.webapp_dir / "uploads"
    # Uploads left by a previous run (a crash between receiving and forwarding) are removed.
    shutil.rmtree(uploads, ignore_errors=True)
    uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ.update(envs.gradio_environment(uploads))


def create_webapp(settings: ApplianceSettings) -> FastAPI:
    prepare_environment(settings)
    # Only now: gradio reads GRADIO_TEMP_DIR when it is imported (its DEFAULT_TEMP_DIR); imported
    # before, it used /tmp/gradio, which another account may own (gradio 6.31 makes a folder
    # there at start, and the web app of a service account died on it).
    import gradio as gr

    from appliance.webapp.app import CSS, build_app

    if settings.gateway.tls:
        # The gateway makes the certificate at its first start; if this starts first, it does.
        ensure_certificate(*settings.tls_files)
    client = GatewayClient(
        settings.webapp.gateway_url or settings.gateway_url,
        settings.webapp.request_timeout_s,
        verify=settings.tls_verify,
    )

    oidc = OidcSignIn(settings, client) if "oidc" in settings.identity.sources else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        try:
            yield
        finally:
            await client.aclose()
            if oidc is not None:
                oidc.close()

    app = FastAPI(title="appliance web app", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Whether the web app can serve anyone: the gateway it talks to answers (over TLS
        where the gateway has it, with the certificate the web app trusts)."""
        try:
            gateway = await client.health()
        except GatewayError as exc:
            return JSONResponse({"status": "unavailable", "gateway": str(exc)}, 503)
        # As the gateway saw this very request: whether it arrived over TLS.
        return JSONResponse({"status": "ok", "gateway": "ok", "gateway_tls": gateway.get("tls")})

    if oidc is not None:
        oidc.mount(app)  # before Gradio, mounted at /, would take the paths
    secret = browser_secret(settings)
    # Gradio's own upload and download endpoints would serve anyone: signed-in users only.
    guard_files(app, client, secret)
    blocks = build_app(settings, client, secret, oidc)
    # Handlers wait on the gateway (I/O): no reason to serialize users behind one another.
    blocks.queue(default_concurrency_limit=None)
    return gr.mount_gradio_app(
        app,
        blocks,
        path="",
        footer_links=[],
        # The gateway's limit on a knowledge-base upload (larger: 413 before it is stored).
        max_file_size=settings.rag.max_upload_bytes,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        theme=gr.themes.Default(primary_hue="indigo"),
        css=CSS,
    )


def run_webapp(settings: ApplianceSettings, host: str | None = None, port: int | None = None):
    import uvicorn

    app = create_webapp(settings)

    uvicorn.run(
        app,
        **server_options(settings.webapp.tls, *settings.tls_files),
        host=host or settings.webapp.host,
        port=port or settings.webapp.port,
        log_level="info",
        access_log=False,
        # Forwarded headers from the configured proxies only (uvicorn's default believes any
        # local process), as the gateway does.
        proxy_headers=bool(settings.webapp.trusted_proxies),
        forwarded_allow_ips=settings.webapp.trusted_proxies or None,
        timeout_graceful_shutdown=5,
    )
