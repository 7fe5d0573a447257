"""Configuration of the gateway's way to the cluster through the SSH circuit breaker."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BreakerSettings(BaseModel):
    """Reach the cluster only through its breaker (an SSH key pinned to `appliance breaker serve`)
    instead of running Slurm commands and calling instances directly."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = False
    """Send every cluster action (list, start and stop instances, each request to an instance)
    through the breaker. The gateway host then needs no Slurm tools, no access to the cluster's
    state directory and no route to the compute nodes."""

    host: str = ""
    """The cluster host whose sshd runs the breaker for the key below (its head node)."""

    port: int = Field(default=22, ge=1, le=65535)
    """sshd's port on `host`."""

    user: str = "appliance"
    """The account on `host` whose authorized_keys pins the key to the breaker."""

    identity_file: Path | None = None
    """Private key of the breaker (mode 0600). The matching public key goes into the cluster
    account's authorized_keys as `appliance breaker authorized-key` prints it."""

    known_hosts_file: Path | None = None
    """The cluster host's key, as `ssh-keyscan` writes it. Required: the host key is always
    checked, never learnt on first use."""

    connect_timeout_s: int = Field(default=10, ge=1, le=120)
    """Seconds to wait for the SSH connection."""

    control_persist_s: int = Field(default=300, ge=0, le=86400)
    """Keep one SSH connection open this long after its last use and run each command as a new
    session on it (OpenSSH ControlMaster): a request then costs no key exchange. 0: a new
    connection for every command."""

    list_interval_s: float = Field(default=1.0, ge=0.1, le=60)
    """Shortest time between two instance listings (each one runs squeue on the cluster). The
    gateway's health checks and start-up polls share the latest listing."""

    @model_validator(mode="after")
    def _complete(self) -> BreakerSettings:
        if self.enabled:
            missing = [
                name
                for name in ("host", "identity_file", "known_hosts_file")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"breaker.enabled needs {', '.join(missing)}")
        return self
