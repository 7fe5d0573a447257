"""What every subcommand shares: the settings, loaded once, lazily."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import click

from appliance.config import ApplianceSettings, load_settings
from appliance.state_version import refuse_newer


@dataclass
class CliContext:
    """Holds the --config path and the settings built from it on first use."""

    config_file: Path | None = None
    _settings: ApplianceSettings | None = field(default=None, repr=False)

    @property
    def settings(self) -> ApplianceSettings:
        if self._settings is None:
            settings = load_settings(self.config_file)
            # No command of an older release on new data; a state this user cannot read,
            # this command cannot change either.
            with contextlib.suppress(PermissionError):
                refuse_newer(settings.state_dir)
            self._settings = settings
        return self._settings


pass_ctx = click.make_pass_decorator(CliContext)
