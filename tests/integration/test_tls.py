"""TLS: the gateway and the web app serve HTTPS with a certificate made at first start (or the
operator's); clients verify it; the key is private; plain HTTP gets nothing."""

from __future__ import annotations

import socket
import ssl
import stat

import httpx
import pytest
from cryptography import x509

from appliance_dev.stack import free_port, running_gateway, running_webapp
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm]


def test_gateway_and_webapp_serve_https(slurm_cluster, tiny_model_dir, tmp_path):
    settings = stack_settings(
        slurm_cluster,
        tmp_path,
        tiny_catalog(tiny_model_dir),
        gateway={"tls": True},
        webapp={"tls": True, "port": free_port()},
    )
    cert_path, key_path = settings.tls_files
    with running_gateway(settings) as url, running_webapp(settings) as web:
        trust = settings.tls_verify  # what the appliance's own clients verify with
        assert url.startswith("https://") and web.startswith("https://")
        assert httpx.get(url + "/health", verify=trust).json() == {"status": "ok", "tls": True}
        assert httpx.get(web + "/health", verify=trust).status_code == 200
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is not trusted
            httpx.get(url + "/health", verify=ssl.create_default_context())
        plain = url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(plain + "/health", timeout=5)
        # The web app reaches the gateway over TLS too, trusting the appliance's certificate:
        # the gateway itself says the web app's request came over TLS.
        assert httpx.get(web + "/", verify=trust).status_code == 200
        ready = httpx.get(web + "/ready", verify=trust, timeout=30)
        assert ready.json() == {"status": "ok", "gateway": "ok", "gateway_tls": True}, ready.text
        # ... and that only TLS gets in: a plain-HTTP request on its port gets no HTTP answer.
        with socket.create_connection(("127.0.0.1", settings.gateway.port), timeout=5) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = raw.recv(4096)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"HTTP/"), answer
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
