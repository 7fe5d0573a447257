"""The internal CA: made once per appliance (key 0600 in <state_dir>/keys/tls), it issues each
node the certificate its instances, embedding servers and store service serve TLS with; the
gateway and every other client of those hops verify them against its certificate."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from appliance.security.tls import alt_names, write_pair
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import ApplianceError
from appliance.file_lock import flocked

CA_VALID_DAYS = 3650  # the CA outlives many node certificates; reissue nodes, not the CA
NODE_VALID_DAYS = 825
# A node certificate this close to its end is issued again wherever the CA's key is at hand (the
# installer, or a service starting on the CA's host); elsewhere it is used until it ends.
RENEW_BEFORE_DAYS = 30
# Every node certificate also names the loopback: a node's own probes (the launcher's health
# check) reach its servers there.
LOOPBACK = ("localhost", "127.0.0.1", "::1")


class InternalCaError(ApplianceError):
    """The internal CA or a node's certificate is missing and cannot be made here."""


@dataclass(frozen=True)
class InternalCa:
    """The files of the internal CA under one directory (<state_dir>/keys/tls)."""

    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def key(self) -> Path:
        return self.root / "ca.key"

    def node_cert(self, node: str) -> Path:
        return self.root / "nodes" / f"{node}.crt"

    def node_key(self, node: str) -> Path:
        return self.root / "nodes" / f"{node}.key"

    def ensure(self) -> bool:
        """Make the CA if it does not exist yet; whether it was made."""
        with flocked(self.root / ".lock"):
            if self.cert.exists():
                return False
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "appliance internal CA"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance"),
                ]
            )
            cert = (
                _builder(name, name, key.public_key(), CA_VALID_DAYS)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=False,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .sign(key, hashes.SHA256())
            )
            write_pair(self.cert, self.key, cert, key)
            return True

    def issue(self, node: str, names: list[str] | tuple[str, ...] = ()) -> bool:
        """Give `node` a certificate for its name, `names` (addresses) and the loopback, unless
        it has one that is not near its end (RENEW_BEFORE_DAYS); whether one was issued. Needs
        the CA's key (the installer's, or this host's on a single host)."""
        with flocked(self.root / ".lock"):
            ends = self._ends(node)
            now = dt.datetime.now(dt.UTC)
            if ends is not None and ends - now > dt.timedelta(days=RENEW_BEFORE_DAYS):
                return False
            if not self.key.exists():
                if ends is not None and ends > now:
                    return False  # renewed where the CA's key is: the installer
                what = f"the certificate ended {ends:%Y-%m-%d}" if ends else "no certificate"
                raise InternalCaError(
                    f"{what} for node {node} in {self.root / 'nodes'}, and the internal CA's key "
                    "is not on this host to issue one (run the installer for this node)"
                )
            ca_key = serialization.load_pem_private_key(self.key.read_bytes(), None)
            ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node[:64])])
            alt = alt_names([node, *names, *LOOPBACK])
            cert = (
                _builder(subject, ca_cert.subject, key.public_key(), NODE_VALID_DAYS)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                )
                .sign(ca_key, hashes.SHA256())
            )
            for stale in (self.node_cert(node), self.node_key(node)):
                stale.unlink(missing_ok=True)  # half a pair (a crash between the writes)
            write_pair(self.node_cert(node), self.node_key(node), cert, key)
            return True

    def _ends(self, node: str) -> dt.datetime | None:
        """When the node's certificate ends; None without a whole, readable pair."""
        if not (self.node_cert(node).exists() and self.node_key(node).exists()):
            return None
        try:
            cert = x509.load_pem_x509_certificate(self.node_cert(node).read_bytes())
        except ValueError:
            return None  # damaged: issued again
        return cert.not_valid_after_utc

    def node_files(self, node: str) -> tuple[Path, Path]:
        """The node's certificate and key, issued first where the CA's key is at hand."""
        self.issue(node)
        return self.node_cert(node), self.node_key(node)

    def client_context(self) -> ssl.SSLContext:
        """Verifies a node's certificate against this CA (and only this CA)."""
        if not self.cert.exists():
            raise InternalCaError(f"the internal CA's certificate {self.cert} is missing")
        return ssl.create_default_context(cafile=str(self.cert))


def resolved_addresses(host: str) -> list[str]:
    """The addresses `host` resolves to here (none if it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def _builder(subject, issuer, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
