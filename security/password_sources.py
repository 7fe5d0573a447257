"""Password sign-in across the enabled sources, in the configured order: local accounts and an
LDAP directory; the directory's groups become a role and groups through the group mapping."""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.security.group_mapping import GroupMapping, MappedIdentity
from appliance.security.ldap_directory import (
    DirectoryUnavailable,
    InvalidCredentials,
    LdapDirectory,
)
from appliance.security.users import MAX_PASSWORD_LENGTH, SignInRefused, UserStore

from appliance.config.identity import IdentitySettings

# Names sent to a directory: ASCII letters (lowercased), digits and `_ . @ -`. Directories
# compare names ignoring case, spaces and Unicode width; keeping to these characters makes one
# person one name here (one lockout counter, one owner of conversations), and no name carries
# DN or filter syntax (escaped anyway).
DIRECTORY_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.@-]*$")


@dataclass(frozen=True)
class SignedIn(MappedIdentity):
    """Who a password signed in, and which source vouched for it (`local` or `ldap`)."""

    source: str = "local"


class PasswordSources:
    """Checks a name and password against `identity.sources` in order (`oidc` takes no
    passwords): a local account answers for its own name; the directory for the others."""

    def __init__(self, identity: IdentitySettings, users: UserStore):
        self.sources = [s for s in identity.sources if s in ("local", "ldap")]
        self.users = users
        self.directory = LdapDirectory(identity.ldap) if "ldap" in self.sources else None
        self.mapping = GroupMapping(identity.mapping)

    @property
    def external(self) -> bool:
        """Whether users without a local account may sign in (a directory is enabled)."""
        return self.directory is not None

    def canonical(self, username: str) -> str:
        """The name as kept: lowercase where a directory is enabled (it ignores case, and
        local names are lowercase), so that `Alice` and `alice` are one name."""
        return username.lower() if self.directory is not None else username

    def verify(self, username: str, password: str) -> SignedIn:
        """Who `username` is if `password` is right: SignInRefused if no source accepts it,
        DirectoryUnavailable if none did and the directory could not answer, NotAllowed if
        the directory's user is in none of the allowed groups."""
        unavailable: DirectoryUnavailable | None = None
        for source in self.sources:
            if source == "local":
                try:
                    user = self.users.verify(username, password)
                except SignInRefused:
                    if self.users.get(username) is not None:
                        raise  # the account's own answer: the directory is not asked instead
                    continue
                return SignedIn(user.username, user.role, tuple(user.groups), "local")
            try:
                return self._from_directory(username, password)
            except InvalidCredentials:
                continue
            except DirectoryUnavailable as exc:
                unavailable = exc  # a later source (a local admin) may still answer
        if unavailable is not None:
            raise unavailable
        raise SignInRefused("wrong username or password")

    def _from_directory(self, username: str, password: str) -> SignedIn:
        assert self.directory is not None
        if not DIRECTORY_NAME.fullmatch(username) or not password:
            raise InvalidCredentials("not a name or password the directory is asked about")
        if len(password) > MAX_PASSWORD_LENGTH:
            raise InvalidCredentials("password too long")
        user = self.directory.authenticate(username, password)
        mapped = self.mapping.map(user.username, user.groups)  # NotAllowed goes up as it is
        return SignedIn(mapped.username, mapped.role, mapped.groups, "ldap")
