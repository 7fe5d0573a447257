"""Configuration of where accounts come from: local accounts, LDAP, an OIDC provider."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IdentitySource = Literal["local", "ldap", "oidc"]


class GroupMappingSettings(BaseModel):
    """How a directory's or provider's groups become the appliance's role and groups."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    admin_groups: list[str] = Field(default_factory=list)
    """Members of any of these groups are administrators; everyone else is a user."""

    groups: dict[str, list[str]] = Field(default_factory=dict)
    """Appliance groups (the ones knowledge bases are shared with) granted by a provider group,
    e.g. `{"cn=engineering": ["eng"]}`."""

    keep_unmapped: bool = True
    """Provider groups not named in `groups` are kept under their own name. Off: a user has only
    the appliance groups that `groups` grants."""

    allowed_groups: list[str] = Field(default_factory=list)
    """If set, only members of one of these provider groups may sign in (checked at every token
    check for OIDC bearer tokens, at sign-in for LDAP)."""


class LdapSettings(BaseModel):
    """An LDAP directory: sign in by binding as the user, groups read from the directory."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: str = ""
    """The directory's URL, `ldap://host:389` or `ldaps://host:636`."""

    user_dn_template: str = ""
    """The user's DN with `{username}` in it, e.g. `uid={username},ou=people,dc=example,dc=org`."""

    group_base: str = ""
    """Where groups are searched, e.g. `ou=groups,dc=example,dc=org`."""

    group_filter: str = "(|(member={dn})(uniqueMember={dn})(memberUid={username}))"
    """Which groups the user is in; `{dn}` and `{username}` are filled in (escaped)."""

    group_name_attribute: str = "cn"
    """The attribute that names a group."""

    start_tls: bool = False
    """Upgrade an `ldap://` connection with StartTLS before binding."""

    ca_file: Path | None = None
    """CA bundle that the directory's certificate must chain to (None: the system's)."""

    timeout_s: float = Field(default=5.0, gt=0)
    """Connect and operation timeout."""


class OidcSettings(BaseModel):
    """An OpenID Connect provider: browser sign-in with the authorization-code flow and PKCE,
    and bearer tokens from API clients checked against the provider's keys (JWKS)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    issuer: str = ""
    """The provider's issuer URL (its `/.well-known/openid-configuration` is read from it)."""

    client_id: str = ""
    """The appliance's client id at the provider; bearer tokens must be meant for it (`aud`)."""

    client_secret_file: Path | None = None
    """File holding the client secret (None: a public client, PKCE only)."""

    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    """Scopes asked for at sign-in (add the one that releases groups, if the provider needs it)."""

    username_claim: str = "preferred_username"
    """The claim that names the user."""

    groups_claim: str = "groups"
    """The claim that carries the user's groups."""

    ca_file: Path | None = None
    """CA bundle that the provider's certificate must chain to (None: the system's)."""

    display_name: str = "single sign-on"
    """The provider's name on the web app's sign-in button ("Sign in with ...")."""

    recheck_s: float = Field(default=60.0, ge=0)
    """How often, at most, a bearer token is checked again at the provider's userinfo endpoint
    (a user disabled there, or whose tokens were revoked, is refused from the next check on);
    0: never, a token is then good until it expires."""

    leeway_s: float = Field(default=30.0, ge=0, le=300)
    """Clock difference allowed when checking a token's `exp`, `nbf` and `iat`."""

    timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of one call to the provider (discovery, keys, userinfo, token exchange)."""


class IdentitySettings(BaseModel):
    """Which sign-in sources are enabled, and how their groups map onto the appliance's."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    sources: list[IdentitySource] = Field(default_factory=lambda: ["local"])
    """Enabled sources, tried in this order for a password sign-in (`local`, `ldap`); `oidc`
    adds browser sign-in through the provider and accepts its bearer tokens."""

    mapping: GroupMappingSettings = Field(default_factory=GroupMappingSettings)
    """Groups to role and appliance groups, the same for LDAP and OIDC."""

    ldap: LdapSettings = Field(default_factory=LdapSettings)
    """The LDAP directory (used when `ldap` is in `sources`)."""

    oidc: OidcSettings = Field(default_factory=OidcSettings)
    """The OIDC provider (used when `oidc` is in `sources`)."""

    @model_validator(mode="after")
    def _enabled_sources_are_configured(self) -> IdentitySettings:
        if len(set(self.sources)) != len(self.sources):
            raise ValueError("identity.sources names a source twice")
        if "ldap" in self.sources and not (self.ldap.url and self.ldap.user_dn_template):
            raise ValueError("identity.sources has ldap: set identity.ldap.url, user_dn_template")
        if "oidc" in self.sources and not (self.oidc.issuer and self.oidc.client_id):
            raise ValueError("identity.sources has oidc: set identity.oidc.issuer and client_id")
        return self
