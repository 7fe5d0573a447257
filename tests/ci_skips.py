"""Under CI (`CI` set, as .ci/run does) everything is installed, so a skip can only mean a broken
set-up: it fails the run with its reason. Only tests marked `gpu` may skip there."""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (`CI` set, as .ci/run does) everything is installed, so a skip can only mean a
    broken set-up: it fails the run with its reason. Only tests that need a GPU may skip."""
    report = yield
    gpu = item.get_closest_marker("gpu") is not None
    expected_failure = hasattr(report, "wasxfail")
    if report.skipped and os.environ.get("CI") and not gpu and not expected_failure:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where everything is installed: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import fails under CI too (GPU tests skip with a marker)."""
    report = yield
    if report.skipped and os.environ.get("CI"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where everything is installed: {report.longrepr}"
    return report
