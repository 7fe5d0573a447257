"""Host fingerprints: machine id plus GPU UUIDs from nvidia-smi (through a fake runner)."""

from __future__ import annotations

import hashlib
import re

import pytest
from appliance.security.host import (
    NVIDIA_SMI,
    HostError,
    gpu_uuids,
    host_fingerprint,
    read_machine_id,
    this_host_fingerprint,
)

from appliance.slurm.runner import CommandError, CommandResult

MACHINE_ID = "4c4c4544003957108052b4c04f384833"
GPU_A = "GPU-5a4c1f1e-2b9e-4a8f-8e0e-3f2d1c0b9a87"
GPU_B = "GPU-0e1d2c3b-4a59-4876-9a5b-c4d3e2f1a0b9"


class FakeRunner:
    """Returns canned output for nvidia-smi and records what was run."""

    def __init__(self, stdout: str = "", stderr: str = "", returncode: int = 0, raises=None):
        self.result = (stdout, stderr, returncode)
        self.raises = raises
        self.calls: list[list[str]] = []

    def run(self, argv, *, input=None, env=None, timeout=30.0) -> CommandResult:
        self.calls.append(list(argv))
        if self.raises is not None:
            raise self.raises
        stdout, stderr, returncode = self.result
        return CommandResult(list(argv), returncode, stdout, stderr)


def test_fingerprint_format_and_definition():
    fp = host_fingerprint(MACHINE_ID, [GPU_B, GPU_A])
    assert re.fullmatch(r"hf-[0-9a-f]{24}", fp)
    expected = hashlib.sha256(f"{MACHINE_ID}\n{GPU_B}\n{GPU_A}".encode()).hexdigest()[:24]
    # Sorted: GPU_B ("GPU-0e...") sorts before GPU_A ("GPU-5a...").
    assert fp == "hf-" + expected


def test_fingerprint_is_stable_under_gpu_order_and_sensitive_to_gpus():
    assert host_fingerprint(MACHINE_ID, [GPU_A, GPU_B]) == host_fingerprint(
        MACHINE_ID, [GPU_B, GPU_A]
    )
    assert host_fingerprint(MACHINE_ID, [GPU_A]) != host_fingerprint(MACHINE_ID, [GPU_A, GPU_B])
    assert host_fingerprint(MACHINE_ID, []) != host_fingerprint("other", [])


def test_gpu_uuids_from_captured_output():
    runner = FakeRunner(stdout=f"{GPU_A}\n{GPU_B}\n")
    assert gpu_uuids(runner) == [GPU_A, GPU_B]
    assert runner.calls == [NVIDIA_SMI]
    assert NVIDIA_SMI == ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"]


def test_no_nvidia_smi_means_no_gpus():
    # LocalRunner's way of saying the program is missing.
    missing = CommandError(NVIDIA_SMI, "failed: program not found (is it installed and on PATH?)")
    assert gpu_uuids(FakeRunner(raises=missing)) == []
    assert gpu_uuids(FakeRunner(raises=FileNotFoundError("nvidia-smi"))) == []
    # A shell (runner over SSH) says so with exit status 127.
    assert gpu_uuids(FakeRunner(stderr="sh: nvidia-smi: command not found\n", returncode=127)) == []


def test_no_devices_means_no_gpus():
    assert gpu_uuids(FakeRunner(stdout="No devices were found\n", returncode=6)) == []


def test_failing_nvidia_smi_is_an_error():
    msg = (
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.\n"
    )
    with pytest.raises(HostError, match="nvidia-smi failed with exit status 9: NVIDIA-SMI has"):
        gpu_uuids(FakeRunner(stdout=msg, returncode=9))
    timeout = CommandError(NVIDIA_SMI, "did not finish within 30 s", timed_out=True)
    with pytest.raises(HostError, match="cannot list this host's GPUs"):
        gpu_uuids(FakeRunner(raises=timeout))


def test_unexpected_output_is_an_error():
    with pytest.raises(HostError, match="not a GPU UUID"):
        gpu_uuids(FakeRunner(stdout="uuid\nGPU-1\n"))


def test_read_machine_id_falls_back_and_fails_clearly(tmp_path):
    first, second = tmp_path / "machine-id", tmp_path / "dbus-machine-id"
    second.write_text(MACHINE_ID + "\n")
    assert read_machine_id([first, second]) == MACHINE_ID
    first.write_text("\n")  # empty (as on a freshly built image): not an id
    assert read_machine_id([first, second]) == MACHINE_ID
    second.unlink()
    with pytest.raises(HostError, match=f"cannot read this host's machine id from {first} or"):
        read_machine_id([first, second])


def test_this_host_fingerprint(monkeypatch):
    monkeypatch.setattr("appliance.security.host.read_machine_id", lambda: MACHINE_ID)
    fp = this_host_fingerprint(FakeRunner(stdout=f"{GPU_B}\n{GPU_A}\n"))
    assert fp == host_fingerprint(MACHINE_ID, [GPU_A, GPU_B])
