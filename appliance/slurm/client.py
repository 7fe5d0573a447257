"""SlurmClient: submit, list, cancel jobs and read nodes through the Slurm command-line tools."""

from __future__ import annotations

from pathlib import Path

from appliance.slurm.records import (
    SlurmJob,
    SlurmNode,
    SlurmOutputError,
    parse_sinfo_json,
    parse_squeue_json,
)
from appliance.slurm.runner import CommandError, CommandResult, CommandRunner, SlurmCommandError

# Parts of Slurm's stderr that mean "the controller is not there", and what to tell the operator.
_UNREACHABLE_MARKERS = (
    "Unable to contact slurm controller",
    "Could not establish a configuration source",
    "Connection refused",
    "connect failure",
)
# scancel's words for a job that is already gone: cancelling it again is not an error.
_ALREADY_GONE_MARKERS = ("already completing or completed", "Invalid job id", "already completed")
# Node states that need a reason in `scontrol update` (Slurm rejects them without one).
_STATES_NEEDING_REASON = frozenset({"drain", "down", "fail"})
# One job's state and name, in any state Slurm still keeps (plain squeue honours --jobs).
JOB_BRIEF_ARGS = ["--noheader", "--states=all", "--format=%T %j"]
_NOT_INSTALLED_HINT = (
    "Slurm's command-line tools are not installed here. `appliance cluster up` installs them for "
    "the local cluster (as root); for an existing cluster install its client tools (slurm-client)."
)


class SlurmClient:
    """Thin wrapper over sbatch/squeue/scancel/sinfo/scontrol; parsing lives in `records`."""

    def __init__(
        self, runner: CommandRunner, slurm_conf: Path | None = None, *, timeout: float = 30.0
    ):
        self.runner = runner
        self.slurm_conf = slurm_conf
        self.timeout = timeout

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, script: str) -> int:
        """Submit a batch script (passed on stdin) and return its job id."""
        result = self._run(["sbatch", "--parsable"], input=script)
        # --parsable prints "<id>" or, on a multi-cluster setup, "<id>;<cluster>".
        first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
        try:
            return int(first.split(";", 1)[0])
        except ValueError:
            raise SlurmCommandError(
                result.argv,
                f"printed no job id (stdout: {result.stdout.strip()!r})",
                stderr=result.stderr,
            ) from None

    def jobs(self, name_prefix: str | None = None) -> list[SlurmJob]:
        """Every job squeue still shows (finished ones for MinJobAge), optionally by name prefix."""
        # squeue --json in 22.05 ignores -j/-n/-t filters, so filtering happens here.
        result = self._run(["squeue", "--json"])
        try:
            jobs = parse_squeue_json(result.stdout)
        except SlurmOutputError as exc:
            raise self._output_error(result, exc) from None
        if name_prefix:
            jobs = [j for j in jobs if j.name.startswith(name_prefix)]
        return jobs

    def job(self, job_id: int) -> SlurmJob | None:
        """The job, or None when Slurm no longer knows it (finished longer ago than MinJobAge)."""
        for job in self.jobs():
            if job.job_id == job_id:
                return job
        return None

    def job_state(self, job_id: int) -> tuple[str, str] | None:
        """The job's state and name, or None when Slurm no longer knows it. One job's query:
        `job` reads every job of the cluster, which is slow on a busy one."""
        result = self._run(["squeue", *JOB_BRIEF_ARGS, f"--jobs={job_id}"], check=False)
        if not result.ok:
            if "Invalid job id" in result.stderr:
                return None
            raise self._error(result)
        state, _, name = result.stdout.strip().partition(" ")
        return (state, name) if state else None

    def cancel(self, job_id: int, signal: str | None = None) -> None:
        """Cancel a job, or only send it `signal` (e.g. "TERM", "USR1"); a finished job is fine."""
        argv = ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        argv.append(str(job_id))
        result = self._run(argv, check=False)
        if result.ok or any(m in result.stderr for m in _ALREADY_GONE_MARKERS):
            return
        raise self._error(result)

    # -- nodes and controller -------------------------------------------------------------------

    def nodes(self) -> list[SlurmNode]:
        """Every node of the cluster with its state, CPUs, memory and GRES."""
        result = self._run(["sinfo", "--json"])
        try:
            return parse_sinfo_json(result.stdout)
        except SlurmOutputError as exc:
            raise self._output_error(result, exc) from None

    def ping(self) -> bool:
        """Whether the controller answers (`scontrol ping`); a hung controller counts as down."""
        try:
            result = self._run(["scontrol", "ping"], check=False)
        except SlurmCommandError as exc:
            if exc.timed_out:
                return False
            raise
        return result.ok and " is UP" in result.stdout

    def update_node(self, name: str, state: str, reason: str | None = None) -> None:
        """Set a node's state, e.g. "drain" (a reason is supplied if missing) or "resume"."""
        argv = ["scontrol", "update", f"NodeName={name}", f"State={state}"]
        if reason is None and state.lower() in _STATES_NEEDING_REASON:
            reason = "set by appliance"
        if reason is not None:
            argv.append(f"Reason={reason}")
        self._run(argv)

    # -- plumbing -------------------------------------------------------------------------------

    def _env(self) -> dict[str, str] | None:
        return {"SLURM_CONF": str(self.slurm_conf)} if self.slurm_conf else None

    def _run(
        self, argv: list[str], *, input: str | None = None, check: bool = True
    ) -> CommandResult:
        try:
            result = self.runner.run(argv, input=input, env=self._env(), timeout=self.timeout)
        except SlurmCommandError:
            raise
        except CommandError as exc:
            raise SlurmCommandError(
                exc.argv,
                exc.reason,
                stderr=exc.stderr,
                returncode=exc.returncode,
                hint=_NOT_INSTALLED_HINT if "not found" in exc.reason else self._hint(""),
                timed_out=exc.timed_out,
            ) from None
        if check and not result.ok:
            raise self._error(result)
        return result

    def _error(self, result: CommandResult) -> SlurmCommandError:
        return SlurmCommandError(
            result.argv,
            f"failed (exit {result.returncode})",
            stderr=result.stderr or result.stdout,
            returncode=result.returncode,
            hint=self._hint(result.stderr),
        )

    def _output_error(self, result: CommandResult, exc: SlurmOutputError) -> SlurmCommandError:
        return SlurmCommandError(
            result.argv,
            f"reported: {exc}",
            stderr=result.stderr,
            returncode=result.returncode,
            hint=self._hint(result.stderr),
        )

    def _hint(self, stderr: str) -> str | None:
        if stderr and not any(m in stderr for m in _UNREACHABLE_MARKERS):
            return None
        where = f" (SLURM_CONF={self.slurm_conf})" if self.slurm_conf else ""
        return (
            f"The Slurm controller{where} is not reachable. For the local cluster, "
            "`appliance cluster status` shows whether it runs and `appliance cluster up` starts it."
        )


__all__ = ["SlurmClient", "SlurmJob", "SlurmNode"]
