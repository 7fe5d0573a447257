"""A thin LDAP client for sign-in: bind as the user, then read the groups the user is in."""

from __future__ import annotations

import contextlib
import math
import ssl
from dataclasses import dataclass

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from appliance.config.identity import LdapSettings
from appliance.errors import ApplianceError

INVALID_CREDENTIALS = 49  # LDAP result code: wrong DN or password
MAX_GROUPS = 1000  # a user in more groups than this is cut off, not an error


class InvalidCredentials(ApplianceError):
    """The directory refused the name and password (or they were never sent: empty)."""


class DirectoryUnavailable(ApplianceError):
    """The directory cannot be reached, did not answer in time, or failed the request."""


@dataclass(frozen=True)
class DirectoryUser:
    """A user the directory signed in: the DN bound as and the names of the user's groups."""

    username: str
    dn: str
    groups: tuple[str, ...]


def user_dn(template: str, username: str) -> str:
    """The user's DN: `{username}` in the template replaced by the name escaped for a DN
    (RFC 4514), so that `admin,ou=x` stays one attribute value and names no other entry."""
    if not username:
        raise InvalidCredentials("no username")
    # str.replace, not str.format: a template's other braces are left alone.
    return template.replace("{username}", escape_rdn(username))


def group_filter(template: str, dn: str, username: str) -> str:
    """The group search filter with `{dn}` and `{username}` escaped for a filter (RFC 4515):
    `*)(uid=*` is matched literally and cannot widen the search."""
    return template.replace("{dn}", escape_filter_chars(dn)).replace(
        "{username}", escape_filter_chars(username)
    )


class LdapDirectory:
    """Signs users in against one directory; every call opens its own connection (a sign-in
    is rare, and a connection bound as one user must never serve another)."""

    def __init__(self, settings: LdapSettings):
        self.settings = settings

    def _server(self) -> ldap3.Server:
        cfg = self.settings
        tls = None
        if cfg.url.lower().startswith("ldaps://") or cfg.start_tls:
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(cfg.ca_file) if cfg.ca_file else None,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )
        return ldap3.Server(cfg.url, tls=tls, connect_timeout=cfg.timeout_s, get_info=ldap3.NONE)

    def authenticate(self, username: str, password: str) -> DirectoryUser:
        """Bind as `username` with `password`, then read the user's groups. InvalidCredentials
        for a wrong name or password, DirectoryUnavailable when the directory cannot answer."""
        if not password:
            # An empty password makes a simple bind "unauthenticated" (RFC 4513 5.1.2), which
            # many directories accept as a success: it must never be sent.
            raise InvalidCredentials("no password")
        cfg = self.settings
        dn = user_dn(cfg.user_dn_template, username)
        conn = ldap3.Connection(
            self._server(),
            user=dn,
            password=password,
            authentication=ldap3.SIMPLE,
            read_only=True,
            raise_exceptions=False,
            auto_referrals=False,  # a referral would send the password to another server
            receive_timeout=math.ceil(cfg.timeout_s),  # whole seconds: a socket option
        )
        try:
            conn.open()
            ldaps = cfg.url.lower().startswith("ldaps://")
            if cfg.start_tls and not ldaps and not conn.start_tls():
                raise DirectoryUnavailable(f"StartTLS refused: {_result(conn)}")
            if not conn.bind():
                if conn.result and conn.result.get("result") == INVALID_CREDENTIALS:
                    raise InvalidCredentials("wrong username or password")
                raise DirectoryUnavailable(f"bind failed: {_result(conn)}")
            groups = self._groups(conn, dn, username)
        except LDAPException as exc:
            raise DirectoryUnavailable(f"{cfg.url}: {exc}") from None
        finally:
            _close(conn)
        return DirectoryUser(username, dn, groups)

    def _groups(self, conn: ldap3.Connection, dn: str, username: str) -> tuple[str, ...]:
        """The names of the groups under group_base whose filter matches the user."""
        cfg = self.settings
        if not cfg.group_base:
            return ()
        found = conn.search(
            cfg.group_base,
            group_filter(cfg.group_filter, dn, username),
            ldap3.SUBTREE,
            attributes=[cfg.group_name_attribute],
            size_limit=MAX_GROUPS,
            time_limit=math.ceil(cfg.timeout_s),
        )
        # No match is a success with no entries; anything else (a wrong group_base, no right
        # to search) must not pass for "in no group".
        if not found and conn.result.get("result") not in (0, 4):  # 4: size limit exceeded
            raise DirectoryUnavailable(f"group search failed: {_result(conn)}")
        names: set[str] = set()
        for entry in conn.response or []:
            if entry.get("type") != "searchResEntry":
                continue  # search references are not followed
            value = entry["attributes"].get(cfg.group_name_attribute) or []
            names.update(str(v) for v in (value if isinstance(value, list) else [value]))
        return tuple(sorted(names))


def _result(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    return f"{result.get('description', 'no answer')} {result.get('message', '')}".strip()


def _close(conn: ldap3.Connection) -> None:
    with contextlib.suppress(LDAPException):  # already closed by the error that ended the call
        conn.unbind()
