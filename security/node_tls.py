"""How the stack reaches the servers on its nodes (instances, embedding servers, store services):
HTTPS verified against the internal CA, and plain HTTP to another host refused unless
serving.allow_plain_http says otherwise."""

from __future__ import annotations

import ipaddress
import ssl
from urllib.parse import urlsplit

from appliance.security.internal_ca import InternalCa

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError

_LOOPBACK_NAMES = ("localhost",)


class PlainHttpRefused(ApplianceError):
    """A node's server on another host answers plain HTTP, and the configuration does not allow
    it."""


def internal_ca(settings: ApplianceSettings) -> InternalCa:
    return InternalCa(settings.layout.internal_tls)


def ensure_internal_ca(settings: ApplianceSettings) -> None:
    """Make the internal CA on first start (a single host; the installer makes it elsewhere)."""
    if settings.serving.tls:
        internal_ca(settings).ensure()


def instance_ssl(settings: ApplianceSettings) -> ssl.SSLContext | None:
    """What clients verify instances with: the internal CA, once it exists."""
    ca = internal_ca(settings)
    return ca.client_context() if ca.cert.exists() else None


def verify(settings: ApplianceSettings) -> ssl.SSLContext | bool:
    """httpx's `verify` for instances: the internal CA, else the system's CAs."""
    return instance_ssl(settings) or True


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(settings: ApplianceSettings, url: str, what: str) -> None:
    """Raise PlainHttpRefused for plain HTTP to another host unless it is allowed."""
    parts = urlsplit(url)
    if parts.scheme == "https" or settings.serving.allow_plain_http:
        return
    if is_loopback(parts.hostname or ""):
        return
    raise PlainHttpRefused(
        f"{what} answers plain HTTP at {url} on another host: refused (serve it with TLS, "
        "serving.tls: true, or allow it for development with serving.allow_plain_http: true)"
    )
