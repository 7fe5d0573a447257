"""Replays Slurm output captured from a real 22.05 cluster (tests/unit/testdata/slurm/).

The captures come from ``python -m tests.unit.capture_slurm_testdata``; ``index.json`` holds each
command's argv and exit status, ``<name>.stdout`` / ``<name>.stderr`` what it printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from appliance.slurm.runner import CommandError, CommandResult

TESTDATA = Path(__file__).parent / "testdata" / "slurm"


def capture(name: str) -> CommandResult:
    """One captured command with exactly what it printed and returned."""
    index = json.loads((TESTDATA / "index.json").read_text())
    entry = index[name]
    return CommandResult(
        argv=list(entry["argv"]),
        returncode=entry["returncode"],
        stdout=(TESTDATA / f"{name}.stdout").read_text(),
        stderr=(TESTDATA / f"{name}.stderr").read_text(),
    )


@dataclass
class Call:
    """One command the code under test ran."""

    argv: list[str]
    input: str | None
    env: dict[str, str] | None
    timeout: float


@dataclass
class ReplayRunner:
    """A CommandRunner that answers each command with a captured result, recording every call."""

    answers: dict[tuple[str, ...], CommandResult | CommandError] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def answer(self, argv: list[str], result: CommandResult | CommandError) -> ReplayRunner:
        """Answer `argv` with `result`, or raise it when it is a CommandError."""
        self.answers[tuple(argv)] = result
        return self

    def replay(self, *names: str) -> ReplayRunner:
        """Answer each capture's own command with its captured result."""
        for name in names:
            result = capture(name)
            self.answer(result.argv, result)
        return self

    def run(
        self,
        argv: list[str],
        *,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> CommandResult:
        self.calls.append(Call(list(argv), input, env, timeout))
        try:
            result = self.answers[tuple(argv)]
        except KeyError:
            raise AssertionError(f"unexpected command {argv}") from None
        if isinstance(result, CommandError):
            raise result
        return CommandResult(list(argv), result.returncode, result.stdout, result.stderr)
