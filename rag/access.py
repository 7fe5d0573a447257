"""Who may read and who may change a knowledge base."""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.rag.errors import AccessDenied, KnowledgeBaseNotFound
from appliance.security.api_keys import Principal

__all__ = ["KnowledgeBaseACL", "Principal", "require_read", "require_write"]


@dataclass(frozen=True)
class KnowledgeBaseACL:
    """The owner and admins change a knowledge base; readers and members of groups also read it."""

    owner: str
    readers: frozenset[str] = field(default_factory=frozenset)
    groups: frozenset[str] = field(default_factory=frozenset)

    def can_read(self, principal: Principal) -> bool:
        return (
            self.can_write(principal)
            or principal.user in self.readers
            or not self.groups.isdisjoint(principal.groups)
        )

    def can_write(self, principal: Principal) -> bool:
        return principal.admin or principal.user == self.owner


def require_read(principal: Principal, kb_name: str, acl: KnowledgeBaseACL | None) -> None:
    """Raise KnowledgeBaseNotFound unless the knowledge base exists (`acl`) and is readable."""
    if acl is None or not acl.can_read(principal):
        raise KnowledgeBaseNotFound(principal.user, kb_name)


def require_write(principal: Principal, kb_name: str, acl: KnowledgeBaseACL | None) -> None:
    """Raise unless the principal may change the knowledge base.

    A user who may not even read it is told it does not exist, like for a missing one.
    """
    if acl is None or not acl.can_write(principal):
        require_read(principal, kb_name, acl)
        raise AccessDenied(principal.user, kb_name)
