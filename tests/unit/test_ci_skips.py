"""Skips fail the run under CI (tests/ci_skips.py), except for GPU tests; outside CI they stay
skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = """
import pytest

def test_skipped():
    pytest.skip("no frobnicator here")

@pytest.mark.gpu
def test_gpu_skipped():
    pytest.skip("needs an NVIDIA GPU")

@pytest.fixture
def thing():
    pytest.skip("no thing")

def test_fixture_skipped(thing):
    pass
"""


def run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_demo.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rA",
        "-p",
        "tests.ci_skips",
        "-p",
        "no:cacheprovider",
    ]
    markers = ["-o", "markers=gpu: needs a GPU", "--rootdir", str(tmp_path)]
    return subprocess.run(
        [*argv, *markers, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )


def test_under_ci_a_skip_fails_with_its_reason_but_a_gpu_test_may_skip(tmp_path):
    out = run(tmp_path, ci=True)
    assert out.returncode == 1, out.stdout
    assert "FAILED" in out.stdout and "no frobnicator here" in out.stdout
    assert "ERROR" in out.stdout and "no thing" in out.stdout
    assert "SKIPPED" in out.stdout and "needs an NVIDIA GPU" in out.stdout


def test_outside_ci_skips_stay_skips(tmp_path):
    out = run(tmp_path, ci=False)
    assert out.returncode == 0, out.stdout
    assert "3 skipped" in out.stdout
