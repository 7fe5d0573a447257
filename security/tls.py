"""TLS for the gateway and the web app: a certificate the operator gives, or one made here at
install (self-signed, ECDSA P-256, for this host's names and addresses), key file mode 0600."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

from appliance.security.secret_files import write_secret_file
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 825  # the longest validity browsers accept for a server certificate


def host_names() -> list[str]:
    """Names and addresses clients may use for this host."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    return sorted(n for n in names if n)


def make_self_signed(cert_path: Path, key_path: Path, names: list[str] | None = None) -> None:
    """Write a new self-signed certificate and its key (0600); refuses to replace a key."""
    names = names or host_names()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance"),
        ]
    )
    alt = alt_names(names)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    write_pair(cert_path, key_path, cert, key)


def alt_names(names: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names: IP addresses as such, the rest as DNS names (once each)."""
    alt: list[x509.GeneralName] = []
    for n in dict.fromkeys(n for n in names if n):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    return alt


def write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key) -> None:
    """The key first (0600, never over an existing one), then its certificate."""
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret_file(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_certificate(cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    """The certificate and key, made once if neither exists (an operator's own are kept)."""
    if not cert_path.exists() and not key_path.exists():
        make_self_signed(cert_path, key_path)
    return cert_path, key_path


def server_options(enabled: bool, cert_path: Path, key_path: Path) -> dict[str, str]:
    """uvicorn's TLS arguments: none when off; else the certificate, made first if missing."""
    if not enabled:
        return {}
    cert, key = ensure_certificate(cert_path, key_path)
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
