"""Configuration of the web app (Gradio) served next to the gateway."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WebappSettings(BaseModel):
    """Where the web app listens and how it reaches the gateway."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Start the web app with `appliance up`."""

    host: str = "127.0.0.1"
    """Address the web app binds to. Use 0.0.0.0 to serve other machines."""

    port: int = Field(default=7860, ge=1, le=65535)
    """TCP port of the web app."""

    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses (or networks) of reverse proxies whose `X-Forwarded-For` and
    `X-Forwarded-Proto` headers the web app believes. Empty: the headers are ignored."""

    gateway_url: str | None = None
    """Base URL of the gateway's API, as the web app's server reaches it. Default: the gateway
    of this configuration (gateway.host and gateway.port)."""

    tls: bool = False
    """Serve HTTPS with the gateway's certificate (gateway.tls_cert, or the one made for it)."""

    public_url: str | None = None
    """The web app's URL as browsers reach it, e.g. `https://ai.example.org`; the OIDC redirect
    URI is this plus `/oidc/callback`. Default: http(s)://host:port of this section."""

    title: str = "Appliance"
    """Name shown in the browser tab and the page header."""

    request_timeout_s: float = Field(default=600.0, gt=0)
    """Upper bound for one call from the web app to the gateway (a chat answer included)."""

    max_conversations: int = Field(default=100, ge=1, le=10000)
    """Conversations kept per user in the browser; the oldest go first. The browser's storage
    holds a few megabytes."""
