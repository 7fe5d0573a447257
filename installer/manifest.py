"""What the installer created, kept beside the configuration so re-runs and `appliance uninstall`
know what is theirs (packages that were already there are never removed)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.atomic_files import write_json


@dataclass
class Manifest:
    """The installation's record: profile, service mode, and what it added to the system."""

    prefix: str = "/"
    profile: str = ""
    service_mode: str = ""
    packages_installed: list[str] = field(default_factory=list)
    service_user: str | None = None
    service_user_created: bool = False
    files: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return cls()

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    def add_files(self, paths: list[Path]) -> None:
        self.files = sorted(set(self.files) | {str(p) for p in paths})
