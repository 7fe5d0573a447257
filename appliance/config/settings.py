"""The root settings object, its sources (YAML file, environment) and readable errors."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from appliance import envs
from appliance.config.breaker import BreakerSettings
from appliance.config.catalog import CatalogSettings
from appliance.config.cluster import ClusterSettings
from appliance.config.gateway import GatewaySettings
from appliance.config.identity import IdentitySettings
from appliance.config.monitoring import MonitoringSettings
from appliance.config.rag import RagSettings
from appliance.config.security import SecuritySettings
from appliance.config.serving import ServingSettings
from appliance.config.store import StoreSettings
from appliance.config.training import TrainingSettings
from appliance.config.webapp import WebappSettings
from appliance.errors import ApplianceError
from appliance.layout import StateLayout

DEFAULT_CONFIG_FILE = Path("/etc/appliance/config.yaml")


class ConfigError(ApplianceError):
    """A configuration problem, worded for the operator (field name and reason, no traceback)."""


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/appliance")
    return Path.home() / ".local" / "share" / "appliance"


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML configuration file; a broken file becomes a ConfigError naming the line."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None):
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {self.path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            reason = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"config file {self.path}{where}: {reason}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {self.path}: expected a mapping of sections at the top")
        return data


class ApplianceSettings(BaseSettings):
    """Everything the stack can be configured with; see docs/configuration.md for each field."""

    model_config = SettingsConfigDict(
        env_prefix=envs.CONFIG_ENV_PREFIX,
        env_nested_delimiter=envs.CONFIG_ENV_NESTED_DELIMITER,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    state_dir: Path = Field(default_factory=_default_state_dir)
    """Directory for all state: Slurm config and spool, logs, instance endpoints, model files.
    Default: /var/lib/appliance as root, ~/.local/share/appliance otherwise."""

    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    """The Slurm cluster (section `cluster`)."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    """The OpenAI-compatible gateway (section `gateway`)."""

    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    """How the gateway reaches the cluster through the SSH circuit breaker (section `breaker`)."""

    serving: ServingSettings = Field(default_factory=ServingSettings)
    """Model instances (section `serving`)."""

    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    """Model catalog (section `catalog`)."""

    store: StoreSettings = Field(default_factory=StoreSettings)
    """Encrypted model store, keys and load policies (section `store`)."""

    rag: RagSettings = Field(default_factory=RagSettings)
    """Knowledge bases: storage, embeddings, chunking, retrieval (section `rag`)."""

    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    """Metrics, history and node health checks (section `monitoring`)."""

    security: SecuritySettings = Field(default_factory=SecuritySettings)
    """Quotas, rate limits and the audit log (section `security`)."""

    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    """Sign-in sources (local accounts, LDAP, OIDC) and their group mapping (section `identity`)."""

    training: TrainingSettings = Field(default_factory=TrainingSettings)
    """Fine-tuning jobs: default hyperparameters, limits, resources (section `training`)."""

    webapp: WebappSettings = Field(default_factory=WebappSettings)
    """The web app: chat, knowledge bases, models (section `webapp`)."""

    # Set by load_settings: which file the values came from (not a configuration field).
    _config_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then the YAML file, then defaults.
        return (init_settings, env_settings, _YamlSource(settings_cls, _CURRENT_FILE[0]))

    @model_validator(mode="after")
    def _embedding_cache_in_state(self) -> ApplianceSettings:
        # The embedder sees only the rag section; its exports belong with this state's other
        # caches (derived files, left out of backups), so the default is filled in here.
        if self.rag.embedding_cache_dir is None:
            self.rag.embedding_cache_dir = self.state_dir / "cache" / "embeddings"
        return self

    @property
    def config_file(self) -> Path | None:
        """The YAML file these settings were read from, if any."""
        return self._config_file

    # Derived locations: the state layout (appliance/layout.py) with the configuration's
    # overrides, so every module agrees where things live.
    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.state_dir, encrypted=self.security.data_at_rest.enabled)

    @property
    def slurm_dir(self) -> Path:
        return self.layout.slurm.root

    @property
    def log_dir(self) -> Path:
        return self.layout.logs

    @property
    def instances_dir(self) -> Path:
        return self.layout.instances

    def standby_socket(self, node: str) -> Path:
        return self.layout.standby_socket(node)

    @property
    def compile_cache_dir(self) -> Path:
        return self.layout.compile_cache

    @property
    def models_dir(self) -> Path:
        return self.catalog.models_dir or self.layout.models

    @property
    def store_root(self) -> Path:
        return self.store.root or self.layout.store

    @property
    def kek_file(self) -> Path:
        return self.store.key_file or self.layout.kek

    @property
    def signing_key_file(self) -> Path:
        return self.store.signing_key_file or self.layout.policy_signing_key

    @property
    def rag_dir(self) -> Path:
        return self.rag.persist_dir or self.layout.rag

    @property
    def api_keys_file(self) -> Path:
        return self.layout.api_keys

    @property
    def users_file(self) -> Path:
        return self.layout.users

    @property
    def audit_dir(self) -> Path:
        return self.layout.audit

    @property
    def training_dir(self) -> Path:
        return self.layout.training

    @property
    def conversations_dir(self) -> Path:
        return self.layout.conversations

    @property
    def gateway_url(self) -> str:
        """The gateway's base URL as clients on this host (the CLI) reach it."""
        return _local_url(self.gateway.host, self.gateway.port, self.gateway.tls)

    @property
    def webapp_url(self) -> str:
        """The web app's base URL as seen from this host."""
        return _local_url(self.webapp.host, self.webapp.port, self.webapp.tls)

    @property
    def tls_verify(self) -> ssl.SSLContext | bool:
        """What local clients verify the gateway's certificate with (True: the system's CAs).
        Raises FileNotFoundError while the gateway has not made its certificate yet."""
        if not self.gateway.tls:
            return True
        # The gateway's certificate is its own CA (security/tls.py makes it self-signed).
        return ssl.create_default_context(cafile=str(self.tls_files[0]))

    @property
    def tls_files(self) -> tuple[Path, Path]:
        """(certificate, key) of the gateway and the web app."""
        return (
            self.gateway.tls_cert or self.layout.tls / "appliance.crt",
            self.gateway.tls_key or self.layout.tls / "appliance.key",
        )

    @property
    def webapp_dir(self) -> Path:
        return self.layout.webapp

    @property
    def user_catalog_file(self) -> Path:
        return self.layout.user_catalog

    @property
    def slurm_conf(self) -> Path | None:
        if self.cluster.mode == "local":
            return self.layout.slurm.slurm_conf
        return self.cluster.slurm_conf


def _local_url(host: str, port: int, tls: bool = False) -> str:
    # A wildcard bind address is reached on loopback from this host.
    scheme = "https" if tls else "http"
    return f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


# The YAML path for the settings being built; pydantic-settings builds sources per class, so the
# path travels through this one-element holder rather than a constructor argument.
_CURRENT_FILE: list[Path | None] = [None]


def _resolve_config_file(config_file: Path | str | None) -> Path | None:
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    env_path = envs.APPLIANCE_CONFIG
    if env_path:
        path = Path(env_path)
        if not path.exists():
            raise ConfigError(f"config file {path} (from APPLIANCE_CONFIG) does not exist")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: dotted field name, reason, and the rejected value."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown setting (check the spelling; see docs/configuration.md)"
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {value!r})"
        env_name = envs.CONFIG_ENV_PREFIX + envs.CONFIG_ENV_NESTED_DELIMITER.join(
            str(p).upper() for p in err["loc"]
        )
        lines.append(f"  {field}: {reason}{shown}  [env: {env_name}]")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> ApplianceSettings:
    """Build the settings from (in order of precedence) overrides, environment, YAML, defaults."""
    path = _resolve_config_file(config_file)
    _CURRENT_FILE[0] = path
    try:
        settings = ApplianceSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _CURRENT_FILE[0] = None
    settings._config_file = path
    return settings


__all__ = ["ApplianceSettings", "ConfigError", "load_settings"]
