"""The gateway's side of the circuit breaker: every cluster action is one line of the breaker's
grammar (grammar.py) sent over SSH to a key that can run nothing else. One SSH connection is
kept open (OpenSSH ControlMaster) and carries one long-lived `session` of the breaker
(channel.py): each command is a frame on it, answers are multiplexed by request id. A session
that ends is replaced on the next command; its open requests fail with TransportLost, which
the forwarder treats as a broken way to a healthy instance (a stream continues from its
tokens)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

from appliance.config import ApplianceSettings
from appliance.config.breaker import BreakerSettings
from appliance.models.catalog import ModelSpec
from appliance.serving.access import ClusterAccess, InstanceAddress, TransportLost, UpstreamError
from appliance.serving.breaker.channel import BreakerError, Call, Channel
from appliance.serving.breaker.grammar import MAX_AVOID
from appliance.serving.instance import Instance
from appliance.serving.job_script import job_name
from appliance.slurm.records import SlurmJob

log = logging.getLogger(__name__)

# Commands that a replacement session may run again: they change nothing, or nothing twice.
IDEMPOTENT = ("ping", "list-instances", "stop ")
# ssh's own exit status for "could not connect or run the session" (the breaker never uses it).
SSH_FAILED = 255
# What ssh says when the shared connection refuses one more session (sshd's MaxSessions).
_MUX_REFUSED = ("mux_client", "Session open refused", "administratively prohibited")


def control_dir() -> Path:
    """A directory only this user can enter, for the shared connection's socket. It lives in
    the temporary directory because a socket path must stay under about 100 characters."""
    path = Path(tempfile.gettempdir()) / f"appliance-breaker-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise BreakerError(f"{path} is not a private directory of this user; remove it")
    return path


class BreakerClient:
    """The breaker's session over SSH, opened on first use and again after it ends."""

    def __init__(self, cfg: BreakerSettings, max_request_bytes: int):
        self.cfg = cfg
        self.max_request_bytes = max_request_bytes
        self._channel: Channel | None = None
        self._opening = asyncio.Lock()
        # How long a new session may take to answer: the connection, then Python's start.
        self.start_timeout_s = cfg.connect_timeout_s + 30.0

    def argv(self, line: str, shared: bool = True) -> list[str]:
        cfg = self.cfg
        argv = [
            "ssh",
            "-T",
            "-x",
            "-a",
            "-p",
            str(cfg.port),
            "-i",
            str(cfg.identity_file),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={cfg.known_hosts_file}",
            "-o",
            "GlobalKnownHostsFile=none",
            "-o",
            f"ConnectTimeout={cfg.connect_timeout_s}",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "ClearAllForwardings=yes",
            "-o",
            "PermitLocalCommand=no",
        ]
        if shared and cfg.control_persist_s:
            argv += [
                "-o",
                "ControlMaster=auto",
                "-o",
                f"ControlPath={control_dir()}/%C",
                "-o",
                f"ControlPersist={cfg.control_persist_s}",
            ]
        else:
            argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        return [*argv, "--", f"{cfg.user}@{cfg.host}", line]

    async def channel(self) -> Channel:
        """The open session, or a new one once it answers a ping. A session the shared
        connection refuses (sshd's MaxSessions) runs on a connection of its own."""
        async with self._opening:
            if self._channel is not None and not self._channel.closed:
                return self._channel
            if self._channel is not None:
                code, err = await self._channel.close()
                log.warning("the breaker's session ended (%s); opening another", _tail(err, code))
                self._channel = None
            timeout = self.start_timeout_s
            for shared in (True, False):
                channel = Channel(
                    await asyncio.create_subprocess_exec(
                        *self.argv("session", shared),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                        # A Ctrl-C of the gateway reaches it through the gateway.
                        start_new_session=True,
                    )
                )
                try:
                    await asyncio.wait_for(channel.start("ping").head, timeout)
                except (UpstreamError, TimeoutError) as exc:
                    code, err = await channel.close(wait_s=1)
                    if shared and _mux_refused(code, err):
                        continue
                    if isinstance(exc, TimeoutError):
                        raise BreakerError(f"the breaker did not answer in {timeout:g} s") from None
                    raise BreakerError(_failure("session", code, err)) from None
                self._channel = channel
                return channel
        raise BreakerError("the shared connection refused the session, and so did its own")

    async def open(self, line: str, body: bytes = b"", timeout: float = 60.0) -> Call:
        """Send the command and wait for its head (`call.head`); the caller reads the rest.
        BreakerError when refused or unreachable, TransportLost when the session ended,
        TimeoutError (the command given up) when no head came in time."""
        if len(body) > self.max_request_bytes:
            raise BreakerError(f"request body larger than {self.max_request_bytes} bytes")
        call = (await self.channel()).start(line, body)
        try:
            await asyncio.wait_for(asyncio.shield(call.head), timeout)
        except TimeoutError:
            call.cancel()
            raise
        return call

    async def call(self, line: str, timeout: float = 60.0) -> dict:
        """Run a command that answers one JSON head. One that changes nothing, or nothing
        twice, runs again on a new session when its own ended."""
        for attempt in (1, 2):
            try:
                call = await self.open(line, timeout=timeout)
                try:
                    await asyncio.wait_for(call.rest(), timeout)
                except TimeoutError:
                    call.cancel()
                    raise
                return call.head.result()
            except TimeoutError:
                message = f"the breaker did not answer {line!r} in {timeout:g} s"
                raise BreakerError(message) from None
            except TransportLost as exc:
                if attempt == 2 or not line.startswith(IDEMPOTENT):
                    raise BreakerError(f"{line.split(' ')[0]}: {exc}") from None
            except UpstreamError as exc:
                raise BreakerError(str(exc)) from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """End the session: the breaker sees its stdin close and stops its requests."""
        if self._channel is not None:
            await self._channel.close()


def _mux_refused(returncode: int | None, stderr: bytes) -> bool:
    text = stderr.decode(errors="replace")
    return returncode == SSH_FAILED and any(m in text for m in _MUX_REFUSED)


def _failure(line: str, returncode: int | None, stderr: bytes) -> str:
    detail = _tail(stderr, returncode)
    if returncode == SSH_FAILED:
        return f"cannot reach the cluster's breaker: {detail}"
    return f"the breaker refused {line.split(' ')[0]}: {detail.removeprefix('refused: ')}"


def _tail(stderr: bytes, returncode: int | None) -> str:
    text = stderr.decode(errors="replace").strip().splitlines()
    return text[-1] if text else f"exit status {returncode}"


class BreakerResponse:
    """An instance's answer relayed by `forward`, with the part of aiohttp's ClientResponse
    that the forwarder uses."""

    def __init__(self, call: Call, status: int, content_type: str):
        self._call = call
        self.status = status
        self.headers = {"content-type": content_type or "application/json"}
        self.content = self

    async def iter_any(self):
        while (chunk := await self._call.next()) is not None:
            yield chunk

    async def read(self) -> bytes:
        return await self._call.rest()

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop relaying; the breaker stops the request to the instance."""
        self._call.cancel()


class BreakerAccess(ClusterAccess):
    """The cluster through its breaker only: no Slurm commands, no files, no route to nodes."""

    def __init__(self, settings: ApplianceSettings):
        self.settings = settings
        self.client = BreakerClient(settings.breaker, settings.gateway.max_request_bytes)
        self._listing: dict[int, dict] = {}
        self._listed_at = 0.0
        self._list_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.client.call("ping", timeout=self.settings.breaker.connect_timeout_s + 30)

    async def close(self) -> None:
        await self.client.close()
        if self.settings.breaker.control_persist_s:
            # Ends the shared connection (it would outlive the gateway by ControlPersist).
            argv = self.client.argv("ping")
            exit_argv = [*argv[: argv.index("--")], "-O", "exit", *argv[argv.index("--") + 1 : -1]]
            proc = await asyncio.create_subprocess_exec(
                *exit_argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)

    async def _instances(self) -> dict[int, dict]:
        """The latest listing, at most `list_interval_s` old (one squeue on the cluster)."""
        async with self._list_lock:
            if time.monotonic() - self._listed_at >= self.settings.breaker.list_interval_s:
                answer = await self.client.call("list-instances")
                self._listing = {int(i["job_id"]): i for i in answer.get("instances", [])}
                self._listed_at = time.monotonic()
            return self._listing

    async def submit(
        self, spec: ModelSpec, preemptible: bool = False, avoid: frozenset[str] = frozenset()
    ) -> int:
        verb = "start-preemptible" if preemptible else "start"
        line = f"{verb} {spec.name}"
        if avoid:
            line += " avoid " + " ".join(sorted(avoid)[:MAX_AVOID])
        answer = await self.client.call(line)
        self._listed_at = 0.0  # the next poll must see the new job
        return int(answer["job_id"])

    async def cancel(self, job_id: int) -> None:
        await self.client.call(f"stop {job_id}")
        self._listed_at = 0.0

    async def jobs(self) -> list[SlurmJob]:
        return [self._job(i) for i in (await self._instances()).values()]

    def _job(self, entry: dict) -> SlurmJob:
        """The job record of a listing entry, whose keys (the breaker's wire format) are those a
        breaker of an earlier release sends too."""
        return SlurmJob(
            entry["job_id"],
            job_name(self.settings, entry["model"]),
            entry["state"],
            entry.get("reason", ""),
            [entry["node"]] if entry.get("node") else [],
            entry.get("submit_time"),
            partition=entry.get("partition", ""),
            preempt_time=entry.get("preempted_at"),
            # A breaker of an earlier release lists only a preempted job's end (its end of
            # grace time), so an instance it lists gets no successor at its time limit.
            end_time=entry.get("ends_at", entry.get("leave_by")),
            node_drained=bool(entry.get("node_drained")),
            # Not listed by a breaker of an earlier release: no restriction known, so eviction
            # takes room on any node for it, as it did then.
            required_nodes=list(entry.get("required_nodes") or []),
        )

    async def address(self, inst: Instance) -> InstanceAddress | None:
        entry = (await self._instances()).get(inst.job_id)
        if entry is None or not entry.get("registered"):
            return None
        # Not a network address: requests go through `forward JOB`, never to the node.
        return InstanceAddress(
            f"breaker://{inst.job_id}",
            dict(entry.get("phases", {})),
            bool(entry.get("can_sleep")),
        )

    async def healthy(self, inst: Instance) -> bool:
        try:
            entry = (await self._instances()).get(inst.job_id)
        except BreakerError as exc:
            log.warning("instance listing failed: %s", exc)
            return False
        return bool(entry and entry.get("healthy"))

    async def open(self, inst: Instance, path: str, raw: bytes) -> BreakerResponse:
        timeout = self.settings.gateway.request_timeout_s
        try:
            call = await self.client.open(f"forward {inst.job_id} POST {path}", raw, timeout)
        except TimeoutError:
            raise UpstreamError(f"no answer from instance {inst.job_id} in {timeout:g} s") from None
        except BreakerError as exc:
            raise UpstreamError(str(exc)) from None
        head = call.head.result()
        try:
            return BreakerResponse(call, int(head["status"]), head.get("content_type", ""))
        except (KeyError, TypeError, ValueError):
            call.cancel()
            message = f"the breaker's answer for instance {inst.job_id} is malformed"
            raise UpstreamError(message) from None
