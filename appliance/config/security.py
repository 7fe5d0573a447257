"""Configuration of quotas, rate limits and the audit log."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """Limits for one user or key; None: no limit."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    requests_per_minute: int | None = Field(default=None, ge=1)
    """Requests in any 60 seconds."""

    tokens_per_day: int | None = Field(default=None, ge=1)
    """Tokens per UTC day: prompt and completion tokens of every choice, streamed or not, plus
    the tokens knowledge bases embed for the user (uploaded chunks, queries), counted 1:1. A
    request that starts under the limit is served in full; the next one is refused."""

    concurrent_streams: int | None = Field(default=None, ge=1)
    """Streamed answers at the same time."""


class DataAtRestSettings(BaseModel):
    """Encryption of user data at rest: knowledge bases, conversations, fine-tuning files and
    uploads live in gocryptfs volumes (docs/security.md)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = False
    """Keep user data (knowledge bases, conversations, fine-tuning files, uploads, scratch
    files) in an encrypted volume under `<state_dir>/data`, its ciphertext in
    `<state_dir>/vault`, keyed by a key that the key-encryption key (`store.key_file`) wraps
    and a signed policy (service account, hosts, expiry) releases: `appliance data init` makes
    it, `appliance data policy` signs a new policy, `appliance data seal` moves an unencrypted
    state's user content in. The services refuse to start, saying why, where the policy fails.
    The installer turns it on; the CPU demo has no key-encryption key and leaves it off.
    `rag.persist_dir` must stay unset while it is on."""


class SecuritySettings(BaseModel):
    """Who may use how much, and what the audit log records."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    quotas: Limits = Field(default_factory=Limits)
    """Limits for every user and every key, unless set below. Each request counts against both
    its key and its user."""

    user_quotas: dict[str, Limits] = Field(default_factory=dict)
    """Limits of particular users, by user name (replacing `quotas` for them)."""

    key_quotas: dict[str, Limits] = Field(default_factory=dict)
    """Limits of particular API keys, by key id (replacing `quotas` for them)."""

    data_at_rest: DataAtRestSettings = Field(default_factory=DataAtRestSettings)
    """Encryption of user data at rest."""

    max_n: int = Field(default=16, ge=1, le=16384)
    """Most choices one completion request may ask for (`n`, and `best_of`): each is generated
    in full. A request above it gets HTTP 400."""

    audit_prompts: bool = False
    """Record the messages of chat and completion requests in the audit log. Off: the log says
    who asked which model, never what."""

    service_user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    """Account the gateway and the web app run as when started by root: they hand it the state
    they write (keys, audit log, logs, instance endpoints, knowledge bases, conversations), then
    give up root for good. Instances and training jobs are submitted, and so run, as this
    account. The installer creates `appliance` for this. None: run as whoever starts them."""
