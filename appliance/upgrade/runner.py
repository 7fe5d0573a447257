"""Running the pending migration steps. The record moves to a step's version only after all of
that step's migrations succeeded; each migration is idempotent, so after a crash the same
command runs the unfinished step again from its start."""

from __future__ import annotations

from collections.abc import Callable

from appliance.config import ApplianceSettings
from appliance.state_version import (
    SCHEMA_VERSION,
    refuse_newer,
    state_version,
    write_record,
)
from appliance.upgrade.steps import STEPS, Step, pending


def pending_steps(settings: ApplianceSettings, steps: tuple[Step, ...] = STEPS) -> list[Step]:
    """The steps `migrate` would run now (none for a fresh or current state directory)."""
    refuse_newer(settings.state_dir)
    version = state_version(settings.state_dir)
    return [] if version is None else pending(version, steps)


def migrate(
    settings: ApplianceSettings,
    steps: tuple[Step, ...] = STEPS,
    progress: Callable[[str], None] = lambda line: None,
) -> list[Step]:
    """Bring the state directory to SCHEMA_VERSION; the steps run. A fresh directory is only
    stamped; a newer one is refused (StateVersionError)."""
    refuse_newer(settings.state_dir)
    version = state_version(settings.state_dir)
    if version is None:
        write_record(settings.state_dir, SCHEMA_VERSION)
        return []
    todo = pending(version, steps)
    for step in todo:
        progress(f"step {step.source} -> {step.target}: {step.name}")
        for migration in step.migrations:
            progress(f"  {migration.format}: {migration.description}")
            migration.run(settings)
        write_record(settings.state_dir, step.target)
    return todo
