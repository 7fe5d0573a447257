"""The gateway's side of the circuit breaker: every cluster action is one line of the breaker's
grammar (grammar.py) sent over SSH to a key that can run nothing else. One SSH
connection is kept open and each command runs as a new session on it (OpenSSH ControlMaster)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

from appliance.config import ApplianceSettings
from appliance.config.breaker import BreakerSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import ModelSpec
from appliance.serving.access import ClusterAccess, InstanceAddress, UpstreamError
from appliance.serving.breaker.grammar import MAX_AVOID
from appliance.serving.instance import Instance
from appliance.serving.job_script import job_name
from appliance.slurm.records import SlurmJob

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# ssh's own exit status for "could not connect or run the session" (the breaker never uses it).
SSH_FAILED = 255
# What ssh says when the shared connection refuses one more session (sshd's MaxSessions).
_MUX_REFUSED = ("mux_client", "Session open refused", "administratively prohibited")


class BreakerError(ApplianceError):
    """The breaker refused a command, or could not be reached; the message says which."""


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
    """Runs one breaker command per SSH session."""

    def __init__(self, cfg: BreakerSettings):
        self.cfg = cfg

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

    async def spawn(self, line: str, body: bytes = b"", shared: bool = True):
        """Start the command with `body` on its stdin; the caller reads stdout."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(line, shared),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C of the gateway reaches it through the gateway
        )
        try:
            proc.stdin.write(body)
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the breaker refused before reading: its answer says why
        return proc

    async def session(
        self, line: str, body: bytes = b"", timeout: float = 60.0
    ) -> tuple[asyncio.subprocess.Process, bytes]:
        """Start the command and read the first line of its answer; the caller reads the rest.
        A session the shared connection refuses (sshd's MaxSessions) is retried once on a
        connection of its own. TimeoutError (the command killed) when no line came in time,
        BreakerError when the command ended without one."""
        for shared in (True, False):
            proc = await self.spawn(line, body, shared)
            try:
                first = await asyncio.wait_for(proc.stdout.readline(), timeout)
            except TimeoutError:
                _kill(proc)
                await proc.wait()
                raise
            if first:
                return proc, first
            await proc.wait()
            err = await proc.stderr.read()
            if not (shared and _mux_refused(proc.returncode, err)):
                break
        raise BreakerError(_failure(line, proc.returncode, err))

    async def call(self, line: str, timeout: float = 60.0) -> dict:
        """Run a command that answers one JSON line."""
        message = f"the breaker did not answer {line!r} in {timeout:g} s"
        try:
            proc, first = await self.session(line, timeout=timeout)
        except TimeoutError:
            raise BreakerError(message) from None
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            raise BreakerError(message) from None
        if proc.returncode != 0:
            raise BreakerError(_failure(line, proc.returncode, err))
        try:
            return json.loads(first)
        except ValueError:
            raise BreakerError(f"the breaker's answer to {line!r} is not JSON") from None


def _mux_refused(returncode: int | None, stderr: bytes) -> bool:
    text = stderr.decode(errors="replace")
    return returncode == SSH_FAILED and any(m in text for m in _MUX_REFUSED)


def _failure(line: str, returncode: int | None, stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip().splitlines()
    detail = text[-1] if text else f"exit status {returncode}"
    if returncode == SSH_FAILED:
        return f"cannot reach the cluster's breaker: {detail}"
    return f"the breaker refused {line.split(' ')[0]}: {detail.removeprefix('refused: ')}"


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


class BreakerResponse:
    """An instance's answer relayed by `forward`, with the part of aiohttp's ClientResponse
    that the forwarder uses."""

    def __init__(self, proc: asyncio.subprocess.Process, status: int, content_type: str):
        self._proc = proc
        self.status = status
        self.headers = {"content-type": content_type or "application/json"}
        self.content = self

    async def iter_any(self):
        while chunk := await self._proc.stdout.read(CHUNK):
            yield chunk
        await self._finished()

    async def read(self) -> bytes:
        body = await self._proc.stdout.read()
        await self._finished()
        return body

    async def _finished(self) -> None:
        code = await self._proc.wait()
        if code != 0:
            err = (await self._proc.stderr.read()).decode(errors="replace").strip()
            raise UpstreamError(f"the breaker's forward ended with status {code}: {err[-300:]}")

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop relaying; the cluster side sees its stdout close and drops the request."""
        if self._proc.returncode is None:
            _kill(self._proc)


class BreakerAccess(ClusterAccess):
    """The cluster through its breaker only: no Slurm commands, no files, no route to nodes."""

    def __init__(self, settings: ApplianceSettings):
        self.settings = settings
        self.client = BreakerClient(settings.breaker)
        self._listing: dict[int, dict] = {}
        self._listed_at = 0.0
        self._list_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.client.call("ping", timeout=self.settings.breaker.connect_timeout_s + 30)

    async def close(self) -> None:
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
            proc, first = await self.client.session(
                f"forward {inst.job_id} POST {path}", raw, timeout
            )
        except TimeoutError:
            raise UpstreamError(f"no answer from instance {inst.job_id} in {timeout:g} s") from None
        except BreakerError as exc:
            raise UpstreamError(str(exc)) from None
        try:
            head = json.loads(first)
            return BreakerResponse(proc, int(head["status"]), head.get("content_type", ""))
        except (ValueError, KeyError, TypeError):
            _kill(proc)
            message = f"the breaker's answer for instance {inst.job_id} is malformed"
            raise UpstreamError(message) from None
