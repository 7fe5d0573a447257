"""The breaker's grammar: what it accepts is exactly the fixed commands with strict fields;
everything else (shell syntax, long fields, unknown verbs, path tricks, fuzz) is refused."""

from __future__ import annotations

import random
import string

import pytest

from appliance.cli.breaker import authorized_key_line
from appliance.names import MODEL_NAME
from appliance.serving.breaker.grammar import (
    JOB_ID,
    NODE,
    PATHS,
    Command,
    Forward,
    ListInstances,
    Ping,
    Refused,
    Session,
    Start,
    Stop,
    parse,
)

VALID = {
    "ping": Ping(),
    "list-instances": ListInstances(),
    "session": Session(),
    "start tiny-chat": Start("tiny-chat"),
    "start Qwen2.5-7B": Start("Qwen2.5-7B"),
    "start-preemptible tiny-chat": Start("tiny-chat", preemptible=True),
    "start-preemptible tiny-chat avoid n1": Start("tiny-chat", True, frozenset({"n1"})),
    "start tiny-chat avoid gpu-01 g_2": Start("tiny-chat", False, frozenset({"gpu-01", "g_2"})),
    "stop 42": Stop(42),
    "forward 7 POST /v1/chat/completions": Forward(7, "POST", "/v1/chat/completions"),
    "forward 7 GET /health": Forward(7, "GET", "/health"),
}
INJECTIONS = [
    "ping; touch /tmp/canary",
    "ping && touch /tmp/canary",
    "ping | sh",
    "ping `id`",
    "start $(touch /tmp/canary)",
    "start ${IFS}x",
    "ping\ntouch /tmp/canary",
    "ping\r",
    "start 'tiny-chat'",
    'start "tiny-chat"',
    "start tiny-chat #",
    "start tiny chat",
    "start  tiny-chat",
    " ping",
    "ping ",
    "start ../../etc/passwd",
    "start .hidden",
    "start " + "a" * 65,
    "stop 0",
    "stop -1",
    "stop 12345678901",
    "stop 1e3",
    "stop 0x10",
    "forward 7 POST /v1/../../etc/passwd",
    "forward 7 POST /v1/chat/completions/../x",
    "forward 7 DELETE /v1/models",
    "forward 7 POST http://evil/v1/models",
    "forward 7 POST //v1/models",
    "forward 7 post /v1/chat/completions",
    "forward 7 POST /v1/chat/completions extra",
    "rm -rf /",
    "bash",
    "sh -c id",
    "PING",
    "ping2",
    "",
    "x" * 300,
    "scp -t /tmp",
    "start\ttiny-chat",
    "start tiny-chat\x00",
    "start tiny-chat;",
    "stop 4 2",
    "start tiny-chat\n",
    "stop 42\n",
    "ping\n",
    "start tiny-chat avoid",
    "start tiny-chat n1",
    "start tiny-chat exclude n1",
    "start tiny-chat avoid n1,n2",
    "start tiny-chat avoid n[1-2]",
    "start tiny-chat avoid -n1",
    "start tiny-chat avoid ../n1",
    "start tiny-chat avoid " + " ".join(["n1"] * 9),
    "start",
    "session 1",
    "session\n",
]


@pytest.mark.parametrize("line", sorted(VALID))
def test_the_fixed_commands_parse(line):
    assert parse(line) == VALID[line]


@pytest.mark.parametrize("line", INJECTIONS)
def test_injections_and_tricks_are_refused(line):
    with pytest.raises(Refused):
        parse(line)


def _mutations(rng: random.Random, base: str) -> str:
    alphabet = string.printable + "é\u202e\x00$`;|&'\"\\{}()<>*?~!"
    chars = list(base)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(chars))
        if op < 0.4:
            chars.insert(pos, rng.choice(alphabet))
        elif op < 0.7 and chars:
            chars.pop(min(pos, len(chars) - 1))
        else:
            chars.insert(pos, rng.choice([" ", ";", "`", "$(", "\n", "..", "/", "-", "|"]))
    return "".join(chars)


def test_fuzzing_accepts_only_well_formed_commands():
    rng = random.Random(20261121)
    lines = []
    for i in range(3000):
        if i % 3 == 0:
            lines.append("".join(rng.choice(string.printable) for _ in range(rng.randint(0, 80))))
        else:
            lines.append(_mutations(rng, rng.choice(list(VALID))))
    accepted = 0
    for line in lines:
        try:
            command = parse(line)
        except Refused:
            continue
        accepted += 1
        assert_within_grammar(line, command)
    assert len(lines) >= 1000 and 0 < accepted < len(lines)


def assert_within_grammar(line: str, command: Command) -> None:
    """What an accepted line may be: no shell syntax, every field of its strict pattern."""
    assert line == line.strip() and not set(line) & set(";|&$`'\"\\\n\r\t(){}<>*?~!")
    if isinstance(command, Start):
        assert MODEL_NAME.fullmatch(command.model)
        assert all(NODE.fullmatch(n) for n in command.avoid)
    elif isinstance(command, Stop | Forward):
        assert JOB_ID.fullmatch(str(command.job_id))
    if isinstance(command, Forward):
        assert command.path in PATHS and command.method in ("GET", "POST")


def test_authorized_keys_line_pins_the_key_to_the_breaker():
    line = authorized_key_line(
        "/opt/appliance/.venv/bin/python", "/etc/appliance/config.yaml", "ssh-ed25519 AAAAC3 web\n"
    )
    assert line == (
        'command="/opt/appliance/.venv/bin/python -m appliance.cli.main --config '
        '/etc/appliance/config.yaml breaker serve",no-port-forwarding,no-X11-forwarding,'
        "no-agent-forwarding,no-pty,no-user-rc ssh-ed25519 AAAAC3 web"
    )
