"""What each installer step did, printed as it goes; a re-run that changes nothing says so."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Report:
    """Steps in order, each changed or unchanged, carried across the installer's two stages."""

    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def step(self, name: str, changed: bool, detail: str = "") -> None:
        (self.changed if changed else self.unchanged).append(name)
        mark = "changed  " if changed else "unchanged"
        print(f"  [{mark}] {name}" + (f": {detail}" if detail else ""), flush=True)

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def section(self, title: str) -> None:
        print(f"\n==> {title}", flush=True)

    def summary(self) -> str:
        if not self.changed:
            return "Nothing changed: this machine already had the installation as planned."
        return f"{len(self.changed)} change(s): {', '.join(self.changed)}."

    # The second stage runs in the new Python environment: it gets the first stage's report.
    def dump(self, path: Path) -> None:
        path.write_text(json.dumps({"changed": self.changed, "unchanged": self.unchanged}))

    @classmethod
    def load(cls, path: Path) -> Report:
        data = json.loads(path.read_text())
        return cls(data["changed"], data["unchanged"])


def fail(message: str, code: int = 1) -> None:
    """Stop the installer with a message for the operator (no traceback)."""
    print(f"\ninstall failed: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
