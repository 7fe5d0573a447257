"""The group mapping policy: external groups to the appliance's role and groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from appliance.security.api_keys import Role

from appliance.config.identity import GroupMappingSettings
from appliance.errors import ApplianceError


class NotAllowed(ApplianceError):
    """The user is in none of the groups allowed to sign in."""


@dataclass(frozen=True)
class MappedIdentity:
    """What an external account is on the appliance: a role and the appliance groups."""

    username: str
    role: Role
    groups: tuple[str, ...]


class GroupMapping:
    """Maps external groups the same way for every source (LDAP and OIDC share it)."""

    def __init__(self, settings: GroupMappingSettings):
        self.settings = settings

    def map(self, username: str, external_groups: Iterable[str]) -> MappedIdentity:
        """The role and groups of a user in `external_groups`; NotAllowed if the configuration
        names allowed groups and the user is in none of them."""
        external = set(external_groups)
        allowed = self.settings.allowed_groups
        if allowed and external.isdisjoint(allowed):
            raise NotAllowed(f"user {username} is in none of the groups allowed to sign in")
        role: Role = "admin" if not external.isdisjoint(self.settings.admin_groups) else "user"
        groups: set[str] = set()
        for group in external:
            granted = self.settings.groups.get(group)
            if granted is not None:
                groups.update(granted)
            elif self.settings.keep_unmapped:
                groups.add(group)
        return MappedIdentity(username, role, tuple(sorted(groups)))
