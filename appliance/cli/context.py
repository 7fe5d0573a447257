"""What every subcommand shares: the settings, loaded once, lazily."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from appliance.config import ApplianceSettings, load_settings


@dataclass
class CliContext:
    """Holds the --config path and the settings built from it on first use."""

    config_file: Path | None = None
    _settings: ApplianceSettings | None = field(default=None, repr=False)

    @property
    def settings(self) -> ApplianceSettings:
        if self._settings is None:
            self._settings = load_settings(self.config_file)
        return self._settings


pass_ctx = click.make_pass_decorator(CliContext)
