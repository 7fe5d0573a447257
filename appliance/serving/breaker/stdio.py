"""The forced command over its stdin and stdout: one command (its answer a JSON line, then a
forward's body as it comes), or a session of framed commands (session.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable

from appliance.config import ApplianceSettings
from appliance.serving.breaker.actions import BreakerActions
from appliance.serving.breaker.grammar import Command, Forward, Session
from appliance.serving.breaker.session import SessionServer
from appliance.slurm.client import SlurmClient


class _LineReply:
    """One command's answer: a JSON line, then the body unframed."""

    def __init__(self, out):
        self.out = out

    async def head(self, data: dict) -> None:
        self.out.write(json.dumps(data).encode() + b"\n")
        self.out.flush()

    async def data(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.out.flush()


def serve(
    settings: ApplianceSettings,
    slurm: SlurmClient,
    command: Command,
    audit: Callable[[str, str], None],
) -> None:
    """Run the one command, or the session, it names (Refused as the actions raise it)."""
    asyncio.run(_serve(settings, slurm, command, audit))


async def _serve(
    settings: ApplianceSettings,
    slurm: SlurmClient,
    command: Command,
    audit: Callable[[str, str], None],
) -> None:
    limit = settings.gateway.max_request_bytes
    async with BreakerActions(settings, slurm) as actions:
        if not isinstance(command, Session):
            body = b""
            if isinstance(command, Forward) and command.method == "POST":
                body = sys.stdin.buffer.read(limit + 1)
            await actions.run(command, body, _LineReply(sys.stdout.buffer))
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
        )
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(1, "wb", buffering=0)
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        try:
            await SessionServer(actions, reader, writer, audit, limit).run()
        finally:
            writer.close()
