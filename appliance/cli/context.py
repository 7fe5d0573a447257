"""What every subcommand shares: the settings, loaded once, lazily."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import click

from appliance.config import ApplianceSettings, load_settings
from appliance.state_version import (
    SCHEMA_VERSION,
    holds_data,
    read_record,
    refuse_newer,
    state_version,
    write_record,
)


@dataclass
class CliContext:
    """Holds the --config path and the settings built from it on first use."""

    config_file: Path | None = None
    # Off for a command whose data was not written by this release (`restore`): it must not
    # be stamped with this release's schema version.
    stamp_fresh: bool = True
    _settings: ApplianceSettings | None = field(default=None, repr=False)
    _was_fresh: bool = field(default=False, repr=False)

    @property
    def settings(self) -> ApplianceSettings:
        if self._settings is None:
            settings = load_settings(self.config_file)
            # No command of an older release on new data; a state this user cannot read,
            # this command cannot change either.
            with contextlib.suppress(PermissionError):
                refuse_newer(settings.state_dir)
                self._was_fresh = state_version(settings.state_dir) is None
            self._settings = settings
        return self._settings

    def close(self) -> None:
        """After the command: data it wrote into a fresh state directory (a key created before
        the first `appliance up`) is this release's, so the directory gets its schema version."""
        if self._settings is None or not self._was_fresh or not self.stamp_fresh:
            return
        state_dir = self._settings.state_dir
        with contextlib.suppress(PermissionError):
            if read_record(state_dir) is None and holds_data(state_dir):
                write_record(state_dir, SCHEMA_VERSION)


pass_ctx = click.make_pass_decorator(CliContext)
