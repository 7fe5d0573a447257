"""The internal CA: made once, keys 0600, node certificates a real TLS handshake accepts for the
node's name only when they come from this CA; plain HTTP to another host refused."""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import stat
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from appliance.security.internal_ca import InternalCa, InternalCaError
from appliance.security.node_tls import PlainHttpRefused, check_transport

from appliance.config import ApplianceSettings


@contextlib.contextmanager
def https_server(cert: Path, key: Path):
    """A real HTTPS server on the loopback; yields its port."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_made_once_with_private_keys(tmp_path):
    ca = InternalCa(tmp_path / "keys" / "tls")
    assert ca.ensure() is True
    first = ca.cert.read_bytes()
    assert ca.ensure() is False and ca.cert.read_bytes() == first
    assert ca.issue("n1", ["10.0.0.7"]) is True
    assert ca.issue("n1") is False
    for key in (ca.key, ca.node_key("n1")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_node_certificate_verified_for_its_name(tmp_path):
    ca = InternalCa(tmp_path / "tls")
    ca.ensure()
    cert, key = ca.node_files("n1")
    with https_server(cert, key) as port:
        # The loopback address is in every node's certificate (the launcher probes there).
        url = f"https://127.0.0.1:{port}/"
        with urllib.request.urlopen(url, context=ca.client_context(), timeout=5) as resp:
            assert resp.read() == b"ok"
        # Clients that do not know the internal CA refuse the certificate.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=5)
        # A plain-HTTP client gets no answer from a TLS port.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
        # The certificate is n1's: a client that wants n2 refuses it.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ca.client_context().wrap_socket(raw, server_hostname="n2")


def test_certificate_of_another_ca_refused(tmp_path):
    ours, theirs = InternalCa(tmp_path / "ours"), InternalCa(tmp_path / "theirs")
    ours.ensure()
    theirs.ensure()
    with (
        https_server(*theirs.node_files("n1")) as port,
        pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        urllib.request.urlopen(
            f"https://127.0.0.1:{port}/", context=ours.client_context(), timeout=5
        )


def test_node_without_certificate_and_no_ca_key(tmp_path):
    ca = InternalCa(tmp_path / "tls")
    ca.ensure()
    ca.key.unlink()  # a worker: the CA's certificate only
    with pytest.raises(InternalCaError, match="run the installer"):
        ca.node_files("n9")


def test_a_certificate_near_its_end_is_issued_again_where_the_ca_key_is(tmp_path, monkeypatch):
    import appliance.security.internal_ca as internal_ca

    ca = InternalCa(tmp_path / "tls")
    ca.ensure()
    monkeypatch.setattr(internal_ca, "NODE_VALID_DAYS", internal_ca.RENEW_BEFORE_DAYS - 1)
    assert ca.issue("n1")
    first = ca.node_cert("n1").read_bytes()
    monkeypatch.undo()
    assert ca.issue("n1")  # near its end: a new one
    renewed = ca.node_cert("n1").read_bytes()
    assert renewed != first
    assert not ca.issue("n1")  # a fresh one is kept
    assert ca.node_cert("n1").read_bytes() == renewed


def test_a_worker_uses_its_certificate_until_it_ends(tmp_path, monkeypatch):
    import appliance.security.internal_ca as internal_ca

    ca = InternalCa(tmp_path / "tls")
    ca.ensure()
    monkeypatch.setattr(internal_ca, "NODE_VALID_DAYS", 1)
    ca.issue("n2")
    monkeypatch.setattr(internal_ca, "NODE_VALID_DAYS", 0)  # ends as it is made
    ca.issue("n3")
    ca.key.unlink()  # a worker: no CA key to renew them with
    # Near its end, still used; ended, refused saying what to do.
    assert ca.node_files("n2") == (ca.node_cert("n2"), ca.node_key("n2"))
    with pytest.raises(InternalCaError, match=r"the certificate ended .*run the installer"):
        ca.node_files("n3")


def test_plain_http_to_another_host_refused(tmp_path):
    settings = ApplianceSettings(state_dir=tmp_path)
    check_transport(settings, "http://127.0.0.1:8000", "instance 1")
    check_transport(settings, "https://10.0.0.7:8000", "instance 1")
    with pytest.raises(PlainHttpRefused, match="allow_plain_http"):
        check_transport(settings, "http://10.0.0.7:8000", "instance 1 of tiny")
    allowed = ApplianceSettings(state_dir=tmp_path, serving={"allow_plain_http": True})
    check_transport(allowed, "http://10.0.0.7:8000", "instance 1")
