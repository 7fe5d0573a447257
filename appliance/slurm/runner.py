"""How commands are run: a small protocol, so the same client works locally or (later) over SSH."""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Protocol

from appliance.errors import ApplianceError

# How much of a command's stderr an error message quotes; Slurm's useful line is usually the last.
_STDERR_QUOTE_CHARS = 2000


@dataclass(frozen=True)
class CommandResult:
    """What a finished command returned."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandRunner(Protocol):
    """Runs one command and returns its result; a non-zero exit is a result, not an exception."""

    def run(
        self,
        argv: list[str],
        *,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> CommandResult:
        """Run argv with `input` on stdin and `env` added to the environment.

        Raises CommandError only when the command could not run to completion (not found, timeout).
        """
        ...


def format_command(argv: list[str]) -> str:
    """A command line as an operator would type it."""
    return shlex.join(argv)


class CommandError(ApplianceError):
    """A command could not run, or failed; carries the command line and its stderr."""

    def __init__(
        self,
        argv: list[str],
        message: str,
        *,
        stderr: str = "",
        returncode: int | None = None,
        hint: str | None = None,
        timed_out: bool = False,
    ):
        self.argv = list(argv)
        self.reason = message
        self.stderr = stderr
        self.returncode = returncode
        self.timed_out = timed_out
        text = f"`{format_command(argv)}` {message}"
        quoted = stderr.strip()[-_STDERR_QUOTE_CHARS:]
        if quoted:
            text += ":\n  " + quoted.replace("\n", "\n  ")
        if hint:
            text += "\n" + hint
        super().__init__(text)


class SlurmCommandError(CommandError):
    """A Slurm command failed or could not run; the message quotes Slurm's own words."""


class LocalRunner:
    """Runs commands on this host with subprocess (no shell)."""

    def run(
        self,
        argv: list[str],
        *,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> CommandResult:
        full_env = {**os.environ, **env} if env else None
        try:
            proc = subprocess.run(
                argv,
                input=input,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                # No stdin inherited from a terminal: a tool that prompts must fail, not hang.
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise CommandError(
                argv, "failed: program not found (is it installed and on PATH?)"
            ) from None
        except PermissionError:
            raise CommandError(argv, "failed: permission denied") from None
        except subprocess.TimeoutExpired as exc:
            # TimeoutExpired carries bytes even in text mode.
            raw = exc.stderr or b""
            stderr = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            raise CommandError(
                argv, f"did not finish within {timeout:g} s", stderr=stderr, timed_out=True
            ) from None
        return CommandResult(list(argv), proc.returncode, proc.stdout, proc.stderr)
