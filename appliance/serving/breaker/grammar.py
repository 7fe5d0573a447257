"""The breaker's grammar. A command is one line of at most 256 characters from a small
alphabet (no quotes, ';', '|', '&', '$', backticks, spaces other than single separators, no
newlines), a known verb, exactly its number of fields, and each field matching its own strict
pattern. Anything else is refused before anything is looked up, opened or run.

    ping                                 -> pong
    list-instances                       -> the cluster's instances (JSON)
    start MODEL [avoid NODE...]          -> submit an instance of a catalog model, on none of
                                            the NODEs (at most 8: where an instance leaves)
    start-preemptible MODEL [avoid NODE...]
                                         -> the same, in the partition batch jobs preempt
    stop JOB_ID                          -> cancel an instance job
    forward JOB_ID METHOD PATH           -> one HTTP request to a registered instance; the body
                                            comes on stdin, the answer (streamed) on stdout
    session                              -> many of the commands above, each in a frame on
                                            stdin (session.py), answers multiplexed on stdout
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.names import MODEL_NAME

MAX_LINE = 256
# Patterns are applied with fullmatch: `$` alone would let a trailing newline through.
_LINE = re.compile(r"^[A-Za-z0-9._/:-]+(?: [A-Za-z0-9._/:-]+)*$")
JOB_ID = re.compile(r"^[1-9][0-9]{0,9}$")
# A Slurm node name (it ends up in `#SBATCH --exclude=`, so no commas, spaces or brackets).
NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_AVOID = 8
METHODS = frozenset({"GET", "POST"})
# The only paths an instance may be asked for, exactly.
PATHS = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        # vLLM's sleep mode (level 1 and all tags: no query string passes the grammar), so the
        # gateway can park and wake an instance; never its other development endpoints.
        "/sleep",
        "/wake_up",
    }
)


class Refused(ValueError):
    """The command is not in the grammar; the message says which rule it broke."""


@dataclass(frozen=True)
class Ping:
    """Is the breaker there?"""


@dataclass(frozen=True)
class ListInstances:
    """The instances the cluster runs."""


@dataclass(frozen=True)
class Session:
    """Serve framed commands on stdin until it closes (only as the SSH command itself)."""


@dataclass(frozen=True)
class Start:
    """Submit an instance of a catalog model (preemptible: in the partition batch preempts),
    on none of the nodes in `avoid`."""

    model: str
    preemptible: bool = False
    avoid: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Stop:
    """Cancel an instance job."""

    job_id: int


@dataclass(frozen=True)
class Forward:
    """One HTTP request to a registered instance."""

    job_id: int
    method: str
    path: str


Command = Ping | ListInstances | Start | Stop | Forward | Session


def _field(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise Refused(f"invalid {what}")
    return value


def parse(line: str | None) -> Command:
    """The command `line` spells, or Refused."""
    if not line:
        raise Refused("empty command")
    if len(line) > MAX_LINE:
        raise Refused(f"command longer than {MAX_LINE} characters")
    if not _LINE.fullmatch(line):
        raise Refused("command has characters or spacing outside the grammar")
    verb, *args = line.split(" ")
    if verb in ("start", "start-preemptible"):
        return _start(verb, args)
    arity = {"ping": 0, "list-instances": 0, "stop": 1, "forward": 3, "session": 0}
    if verb not in arity:
        raise Refused("unknown verb")
    if len(args) != arity[verb]:
        raise Refused(f"{verb} takes {arity[verb]} field(s)")
    if verb == "ping":
        return Ping()
    if verb == "list-instances":
        return ListInstances()
    if verb == "session":
        return Session()
    if verb == "stop":
        return Stop(int(_field(args[0], JOB_ID, "job id")))
    job_id, method, path = args
    if method not in METHODS:
        raise Refused("invalid method")
    if path not in PATHS:
        raise Refused("path not allowed")
    return Forward(int(_field(job_id, JOB_ID, "job id")), method, path)


def _start(verb: str, args: list[str]) -> Start:
    if not args:
        raise Refused(f"{verb} takes a model name")
    model, *rest = args
    if rest and (rest[0] != "avoid" or not 1 <= len(rest) - 1 <= MAX_AVOID):
        raise Refused(
            f"{verb} takes a model name, then optionally `avoid` and 1 to {MAX_AVOID} node names"
        )
    avoid = frozenset(_field(node, NODE, "node name") for node in rest[1:])
    return Start(_field(model, MODEL_NAME, "model name"), verb == "start-preemptible", avoid)
