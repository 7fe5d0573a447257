"""The registry of migration steps: one step per schema version, each naming what it does to
every stored format it touches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.config import ApplianceSettings
from appliance.state_version import SCHEMA_VERSION
from appliance.upgrade import formats

# Every stored format of release 0.1.0's state directory; step 0 -> 1 has an entry for each.
STORED_FORMATS = (
    "accounts",
    "api-keys",
    "audit",
    "kb-registry",
    "chroma",
    "conversations",
    "training",
    "store",
    "usage",
    "config",
)


@dataclass(frozen=True)
class FormatMigration:
    """What one step does to one stored format; `run` is idempotent (safe to repeat)."""

    format: str
    run: Callable[[ApplianceSettings], None]

    @property
    def description(self) -> str:
        """The first paragraph of `run`'s docstring, on one line."""
        return " ".join((self.run.__doc__ or "").strip().split("\n\n")[0].split())


@dataclass(frozen=True)
class Step:
    """From schema `source` to `target` (the next version): its migrations, run in order."""

    name: str
    source: int
    target: int
    migrations: tuple[FormatMigration, ...]


STEPS: tuple[Step, ...] = (
    Step(
        "record-schema-version",
        0,
        1,
        (
            FormatMigration("accounts", formats.check_accounts),
            FormatMigration("api-keys", formats.check_api_keys),
            FormatMigration("audit", formats.check_audit),
            FormatMigration("kb-registry", formats.migrate_kb_registry),
            FormatMigration("chroma", formats.check_chroma),
            FormatMigration("conversations", formats.check_conversations),
            FormatMigration("training", formats.check_training),
            FormatMigration("store", formats.check_store),
            FormatMigration("usage", formats.check_usage),
            FormatMigration("config", formats.check_config),
        ),
    ),
    Step(
        "keyword-index",
        1,
        2,
        # The registry's documents gain their file's sha256 (folder sync) when it opens. The
        # keyword indexes themselves are built by the next step, in each knowledge base's new
        # directory: steps always run through to SCHEMA_VERSION.
        (FormatMigration("kb-registry", formats.migrate_kb_registry),),
    ),
    Step(
        "kb-directories",
        2,
        3,
        (FormatMigration("kb-directories", formats.move_to_kb_directories),),
    ),
)


def pending(version: int, steps: tuple[Step, ...] = STEPS) -> list[Step]:
    """The steps that take `version` to SCHEMA_VERSION, in order."""
    return [step for step in steps if version <= step.source < SCHEMA_VERSION]
