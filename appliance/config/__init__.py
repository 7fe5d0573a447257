"""The stack's one typed configuration: a YAML file plus ``APPLIANCE_*`` environment variables."""

from appliance.config.settings import ApplianceSettings, ConfigError, load_settings

__all__ = ["ApplianceSettings", "ConfigError", "load_settings"]
