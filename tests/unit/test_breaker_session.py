"""The breaker's session (framed commands on one SSH session): every frame is checked against
the same grammar as a single command. Fuzzed frames (at least 1000) are accepted only when they
carry a command of the grammar; the real forced command refuses each of the others alone and
goes on; a frame that breaks the framing ends the session with a refusal, cleanly."""

from __future__ import annotations

import asyncio
import os
import random
import sys

import pytest
from aiohttp import web
from appliance.security.audit import AuditLog

from appliance.config import load_settings
from appliance.serving.breaker.actions import BreakerActions
from appliance.serving.breaker.framing import (
    BREAKER_KINDS,
    CANCEL,
    DATA,
    END,
    GATEWAY_KINDS,
    HEAD,
    OPEN,
    REFUSED,
    Frame,
    FramingError,
    encode,
    read_frame,
)
from appliance.serving.breaker.grammar import Forward, Refused
from appliance.serving.breaker.session import (
    AUDITED_REFUSALS,
    SessionServer,
    decode_request,
    max_open_payload,
)
from appliance.serving.endpoint import InstanceEndpoint, write_endpoint
from appliance.serving.job_script import job_name
from appliance.slurm.client import JOB_BRIEF_ARGS, SlurmClient
from appliance.slurm.runner import CommandResult
from appliance_dev.stack import free_port, write_config
from tests.unit.slurm_replay import ReplayRunner
from tests.unit.test_breaker_grammar import VALID, _mutations, assert_within_grammar

LIMIT = 4096  # the request body limit of these tests
BODY = b'{"model": "tiny-chat", "prompt": "hi"}'


def _valid_frames() -> list[bytes]:
    out = [encode(1, OPEN, line.encode() + b"\n") for line in VALID]
    out.append(encode(1, OPEN, b"forward 7 POST /v1/completions\n" + BODY))
    return out


def _fuzzed(rng: random.Random) -> bytes:
    """A frame from the valid ones: its line mutated, bytes of the frame flipped, cut or grown,
    a body added where none goes, or random bytes."""
    choice = rng.random()
    if choice < 0.35:
        base = rng.choice([*VALID, "forward 7 POST /v1/completions", "session"])
        line = _mutations(rng, base).encode("utf-8", errors="surrogateescape")
        body = BODY if rng.random() < 0.3 else b""
        return encode(rng.randint(0, 5), OPEN, line + b"\n" + body)
    frame = bytearray(rng.choice(_valid_frames()))
    if choice < 0.7:
        for _ in range(rng.randint(1, 3)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    if choice < 0.8:
        return bytes(frame[: rng.randrange(len(frame))])
    if choice < 0.9:
        return bytes(frame) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))


def _decode(data: bytes) -> tuple[Frame, object, bytes]:
    """What the session makes of one frame's bytes: FramingError or Refused, else the frame,
    its command and body."""

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        frame = await read_frame(reader, max_open_payload(LIMIT), GATEWAY_KINDS)
        if frame is None:
            raise FramingError("no frame")
        if not reader.at_eof():
            raise FramingError("bytes after the frame")  # the next frame's: judged on their own
        return frame

    frame = asyncio.run(read())
    if frame.kind == CANCEL:
        return frame, None, b""
    command, body = decode_request(frame, LIMIT)
    return frame, command, body


def test_fuzzed_frames_are_accepted_only_with_a_command_of_the_grammar():
    rng = random.Random(20261206)
    corpus = [_fuzzed(rng) for _ in range(3000)]
    accepted = refused = broken = 0
    for data in corpus:
        try:
            frame, command, body = _decode(data)
        except Refused:
            refused += 1
            continue
        except FramingError:
            broken += 1
            continue
        accepted += 1
        if command is None:  # a cancel: names an id, carries nothing
            assert frame.kind == CANCEL and frame.payload == b""
            continue
        line, _, rest = frame.payload.partition(b"\n")
        assert_within_grammar(line.decode("ascii"), command)
        assert rest == body and len(body) <= LIMIT
        if body:
            assert isinstance(command, Forward) and command.method == "POST"
    assert len(corpus) >= 1000 and accepted and refused > 500 and broken > 500


def test_a_session_inside_a_session_and_stray_bodies_are_refused():
    for payload in (b"session\n", b"ping\n{}", b"forward 7 GET /health\nx", b"ping"):
        with pytest.raises(Refused):
            decode_request(Frame(1, OPEN, payload), LIMIT)
    with pytest.raises(Refused, match="larger than"):
        decode_request(Frame(1, OPEN, b"forward 7 POST /v1/completions\n" + b"x" * 4097), LIMIT)


# ----- the real forced command in session mode --------------------------------------------


@pytest.fixture
def serve(tmp_path):
    """argv and environment of `appliance breaker serve` for `session`, on a cluster side with
    no Slurm (the commands sent here are refused before anything is looked up, or are pings)."""
    settings = load_settings(
        state_dir=str(tmp_path / "state"), gateway={"max_request_bytes": LIMIT}
    )
    config = write_config(settings, tmp_path / "config.yaml")
    argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), "breaker", "serve"]
    return argv, {**os.environ, "SSH_ORIGINAL_COMMAND": "session"}, settings


async def _session(serve, data: bytes, until: int | None) -> tuple[list[Frame], int | None]:
    """Send `data`, read answers until request `until` has ended (None: until the breaker ends
    the session), close; the frames and the exit status. Stopped whatever happens."""
    argv, env, _ = serve
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    got: list[Frame] = []
    try:
        proc.stdin.write(data)
        if until is None:
            proc.stdin.close()  # a frame cut short ends with the stream
        async with asyncio.timeout(120):
            while frame := await read_frame(proc.stdout, 1 << 20, BREAKER_KINDS):
                got.append(frame)
                if frame.request_id == until and frame.kind in (END, REFUSED):
                    break
            if until is not None:
                proc.stdin.close()
            return got, await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_the_forced_command_refuses_each_fuzzed_command_alone_and_goes_on(serve):
    rng = random.Random(7)
    lines = []
    while len(lines) < 1000:
        base = rng.choice(list(VALID))
        line = _mutations(rng, base).encode("utf-8", errors="surrogateescape")
        try:
            decode_request(Frame(1, OPEN, line + b"\n"), LIMIT)
        except Refused:
            lines.append(line)
    data = b"".join(encode(i, OPEN, line + b"\n") for i, line in enumerate(lines, 1))
    data += encode(99999, CANCEL)  # an id that is not open: nothing happens
    ping = len(lines) + 1
    got, _ = asyncio.run(_session(serve, data + encode(ping, OPEN, b"ping\n"), until=ping))
    refusals = {f.request_id for f in got if f.kind == REFUSED}
    assert refusals == set(range(1, ping))
    assert [f for f in got if f.request_id == ping] == [
        Frame(ping, HEAD, b'{"pong": true}'),
        Frame(ping, END),
    ]
    # A flood of refusals costs the sender nothing: the audit log gets a bounded number.
    entries = AuditLog(serve[2].audit_dir).entries()
    assert AUDITED_REFUSALS <= len(entries) <= AUDITED_REFUSALS + 1
    assert (
        entries[-1]["detail"]["reason"]
        == f"{len(lines) - AUDITED_REFUSALS} more refusals in this session"
    )


@pytest.mark.parametrize(
    "bad,words",
    [
        (encode(2, OPEN, b"ping\n" + b"x" * (LIMIT + 300)), b"more than"),
        (encode(2, HEAD, b"{}"), b"unknown frame kind"),
        (encode(0, OPEN, b"ping\n"), b"request id 0 is not free"),
        (b"\x00\x00\x00\x09\x00\x00\x00\x02O" + b"ping", b"inside a frame"),
    ],
)
def test_a_frame_that_breaks_the_framing_ends_the_session_cleanly(serve, bad, words):
    got, status = asyncio.run(_session(serve, encode(1, OPEN, b"ping\n") + bad, until=None))
    assert got[-1].request_id == 0 and got[-1].kind == REFUSED and words in got[-1].payload
    assert status == 0


# ----- requests in flight, in process (Slurm's answer replayed, a real HTTP server) ---------


class _Frames:
    """A writer that decodes what the session writes."""

    def __init__(self):
        self.data = bytearray()
        self.frames: list[Frame] = []

    def write(self, data: bytes) -> None:
        self.data += data
        while len(self.data) >= 9:
            length = int.from_bytes(self.data[:4], "big")
            if len(self.data) < 9 + length:
                break
            rid, kind = int.from_bytes(self.data[4:8], "big"), self.data[8]
            self.frames.append(Frame(rid, kind, bytes(self.data[9 : 9 + length])))
            del self.data[: 9 + length]

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def of(self, request_id: int) -> list[Frame]:
        return [f for f in self.frames if f.request_id == request_id]

    async def until(self, test, what: str) -> None:
        async with asyncio.timeout(30):
            while not test():
                await asyncio.sleep(0.01)


async def _instance(hold: asyncio.Event, closed: list[str]):
    """An instance that streams one event, then holds the answer until `hold` is set; `closed`
    gets the path of each request whose client had gone by then."""

    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {}\n\n")
        await hold.wait()
        try:
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:
            closed.append(request.path)  # the breaker dropped the request
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", free_port())
    await site.start()
    return runner, site._port


def test_requests_over_the_bound_are_refused_alone_and_a_cancel_stops_one(tmp_path):
    settings = load_settings(state_dir=str(tmp_path / "state"))
    name = job_name(settings, "tiny-chat")
    squeue = ["squeue", *JOB_BRIEF_ARGS, "--jobs=7"]
    runner = ReplayRunner().answer(squeue, CommandResult(squeue, 0, f"RUNNING {name}\n", ""))
    slurm = SlurmClient(runner, settings.slurm_conf)
    audited: list[str] = []

    async def scenario():
        hold, closed = asyncio.Event(), []
        server, port = await _instance(hold, closed)
        write_endpoint(
            settings.instances_dir,
            InstanceEndpoint(job_id=7, model="tiny-chat", host="127.0.0.1", port=port, pid=1),
        )
        reader, out = asyncio.StreamReader(), _Frames()
        forward = b"forward 7 POST /v1/completions\n" + BODY
        try:
            async with BreakerActions(settings, slurm) as actions:
                session = SessionServer(
                    actions, reader, out, lambda r, c: audited.append(r), LIMIT, max_in_flight=2
                )
                served = asyncio.create_task(session.run())
                for rid in (1, 2, 3):
                    reader.feed_data(encode(rid, OPEN, forward))
                await out.until(lambda: all(len(out.of(r)) >= 2 for r in (1, 2)), "the streams")
                assert out.of(3) == [Frame(3, REFUSED, b"refused: too many requests in flight")]
                assert [f.kind for f in out.of(1)] == [HEAD, DATA]  # relayed before its end
                reader.feed_data(encode(1, CANCEL) + encode(4, OPEN, b"ping\n"))
                await out.until(lambda: out.of(4), "the ping")
                assert [f.kind for f in out.of(4)] == [HEAD, END]
                hold.set()
                await out.until(lambda: out.of(2)[-1].kind == END and closed, "the ends")
                assert [f.kind for f in out.of(1)] == [HEAD, DATA]  # nothing after its cancel
                assert b"".join(f.payload for f in out.of(2)[1:]) == b"data: {}\n\ndata: [DONE]\n\n"
                reader.feed_data(encode(5, OPEN, forward))
                await out.until(lambda: out.of(5) and out.of(5)[-1].kind == END, "a later one")
                reader.feed_eof()
                await asyncio.wait_for(served, 30)
        finally:
            hold.set()
            await server.cleanup()
        # Slurm was asked by the two first requests, not the later one: the job is known to be
        # an instance for a while.
        assert [c.argv for c in runner.calls] == [squeue, squeue]

    asyncio.run(scenario())
    assert audited == ["too many requests in flight"]
