"""A real OpenLDAP server for tests: Debian's slapd with its own slapd.conf and mdb database in
a temporary directory, loaded from LDIF, on a free loopback port, run as the test's user and
always stopped on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from appliance.security.tls import make_self_signed

from appliance_dev.stack import _terminate, free_port

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
SLAPPASSWD = Path("/usr/sbin/slappasswd")
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
USER_DN_TEMPLATE = f"uid={{username}},{PEOPLE}"


def require_slapd() -> None:
    """Skip without Debian's slapd (a skip fails the run under CI: tests/ci_skips.py)."""
    for program in (SLAPD, SLAPADD, SLAPPASSWD):
        if not program.exists():
            pytest.skip(f"{program} is missing: install Debian's slapd package (./bootstrap test)")


def ssha(password: str) -> str:
    """A salted SHA-1 userPassword value, made by slappasswd as an administrator would."""
    out = subprocess.run(
        [str(SLAPPASSWD), "-h", "{SSHA}", "-s", password],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


def directory_ldif(users: dict[str, str], groups: dict[str, list[str]]) -> str:
    """The base entries, `users` (uid: password) as inetOrgPersons and `groups` (cn: member
    uids) as groupOfNames."""
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups",
    ]
    for uid, password in users.items():
        entries.append(
            f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n"
            f"sn: {uid}\nuserPassword: {ssha(password)}"
        )
    for cn, members in groups.items():
        lines = "".join(f"\nmember: uid={m},{PEOPLE}" for m in members)
        entries.append(f"dn: cn={cn},{GROUPS}\nobjectClass: groupOfNames\ncn: {cn}{lines}")
    return "\n\n".join(entries) + "\n"


def _config(directory: Path, tls: bool) -> str:
    schema = "/etc/ldap/schema"
    certificate = (
        f"TLSCertificateFile {directory / 'cert.pem'}\n"
        f"TLSCertificateKeyFile {directory / 'key.pem'}\n"
        if tls
        else ""
    )
    return (
        f"include {schema}/core.schema\ninclude {schema}/cosine.schema\n"
        f"include {schema}/inetorgperson.schema\ninclude {schema}/nis.schema\n"
        "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
        f"pidfile {directory / 'slapd.pid'}\n{certificate}"
        f'database mdb\nsuffix "{SUFFIX}"\ndirectory {directory / "db"}\nmaxsize 16777216\n'
        # Passwords only for binding; the rest readable by users who bound, not anonymously.
        "access to attrs=userPassword by anonymous auth by * none\n"
        "access to * by users read by * none\n"
    )


@dataclass
class Slapd:
    """A running slapd: its URLs, the CA of its certificate (with TLS), and its process to
    pause (a directory that hangs)."""

    url: str
    process: subprocess.Popen
    ldaps_url: str | None = None
    ca_file: Path | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the block: connections are accepted by the kernel, never answered."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def running_slapd(
    directory: Path, ldif: str, tls: bool = False, timeout: float = 20.0
) -> Iterator[Slapd]:
    """slapd on a free loopback port serving `ldif` from a new database under `directory`
    (with `tls`, StartTLS there and ldaps on a second port, with a self-signed certificate for
    127.0.0.1); yields once it accepts connections; stopped (SIGTERM, then SIGKILL) on exit."""
    require_slapd()
    (directory / "db").mkdir(parents=True, exist_ok=True)
    if tls:
        make_self_signed(directory / "cert.pem", directory / "key.pem", ["127.0.0.1"])
    config = directory / "slapd.conf"
    config.write_text(_config(directory, tls))
    (directory / "data.ldif").write_text(ldif)
    subprocess.run(
        [str(SLAPADD), "-f", str(config), "-l", str(directory / "data.ldif")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port, tls_port = free_port(), free_port()
    urls = [f"ldap://127.0.0.1:{port}"] + ([f"ldaps://127.0.0.1:{tls_port}"] if tls else [])
    log_path = directory / "slapd.log"
    with log_path.open("wb") as log:
        # -d 0: stay in the foreground (a child of this test, not a daemon to hunt down).
        proc = subprocess.Popen(
            [str(SLAPD), "-f", str(config), "-h", " ".join(urls), "-d", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not all(_accepts(p) for p in ([port, tls_port] if tls else [port])):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"slapd did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        if tls:
            yield Slapd(urls[0], proc, urls[1], directory / "cert.pem")
        else:
            yield Slapd(urls[0], proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused slapd cannot act on SIGTERM
        _terminate(proc)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
