"""`install.sh` / `python3 -m appliance.installer` / `appliance install`: plan, then install in two
stages (system Python, then the appliance's own environment)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from appliance.installer.bootstrap import install_packages, install_python
from appliance.installer.hardware import LocalProbe, capture, detect
from appliance.installer.manifest import Manifest
from appliance.installer.options import parse
from appliance.installer.plan import debian_packages, make_plan
from appliance.installer.profile import choose_profile
from appliance.installer.report import Report

# Set for the second stage, which runs in the new environment: the first stage's report file.
STAGE2_ENV = "APPLIANCE_INSTALL_REPORT"


def install(argv: list[str]) -> int:
    options = parse(argv)
    probe = LocalProbe()
    hardware = detect(probe)
    plan = make_plan(options, hardware, probe)
    report_file = os.environ.get(STAGE2_ENV)
    if report_file:
        # Stage two only: it needs the environment the first stage built.
        from appliance.installer.apply import configure

        report = Report.load(Path(report_file))
        return configure(plan, report)
    print(plan.render(), flush=True)
    if plan.blockers:
        print("Nothing was changed.", file=sys.stderr)
        return 2
    if options.dry_run:
        print("Dry run: nothing was changed.")
        return 0

    report = Report()
    manifest = Manifest.load(plan.layout.manifest)
    report.section("System packages and Python environment")
    install_packages(plan, report, manifest)
    manifest.prefix, manifest.profile = str(options.prefix), plan.profile.name
    manifest.save(plan.layout.manifest)
    install_python(plan, report)
    handle, path = tempfile.mkstemp(prefix="appliance-install-", suffix=".json")
    os.close(handle)
    report.dump(Path(path))
    python = str(plan.layout.python)
    # From here on the new environment's own copy of the installer runs, not the checkout's:
    # -I keeps the working directory and PYTHONPATH off sys.path, and the services it starts
    # must not inherit PYTHONPATH either.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    os.execve(
        python,
        [python, "-I", "-m", "appliance.installer", "install", *argv],
        {**env, STAGE2_ENV: path},
    )
    return 0  # pragma: no cover - execve does not return


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "install"
    if command == "install":
        return install(argv)
    if command == "capture":
        # A record of this machine for the tests' hardware profiles.
        probe = LocalProbe()
        hw = detect(probe)
        packages = debian_packages(choose_profile(hw, parse([])))
        print(json.dumps(capture(probe, packages), indent=1))
        return 0
    print(f"unknown command {command!r}: install (the default) or capture", file=sys.stderr)
    return 2
