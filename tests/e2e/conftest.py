"""The whole stack for browser tests (local Slurm, gateway, web app, tiny model, Chroma) with two
accounts, and a headless chromium driven by Playwright. Everything is stopped at the end."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from appliance.security.users import UserStore

from appliance import envs
from appliance.config import ApplianceSettings
from appliance_dev.stack import free_port, running_gateway, running_webapp
from tests.slurm_fixtures import stack_settings, tiny_catalog

CHROMIUM = Path("/usr/bin/chromium")
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go (kept after the run, for people to look at)."""
    repo = Path(__file__).resolve().parents[2]
    out = Path(envs.APPLIANCE_TEST_ARTIFACTS or repo / ".state" / "test-artifacts") / "e2e"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


@pytest.fixture(scope="module")
def web_stack(
    slurm_cluster, tiny_model_dir, tmp_path_factory
) -> Iterator[tuple[str, ApplianceSettings]]:
    """(web app URL, settings) of a running gateway and web app with users alice (admin) and bob."""
    settings = stack_settings(
        slurm_cluster,
        tmp_path_factory.mktemp("web"),
        tiny_catalog(tiny_model_dir),
        rag={"max_upload_bytes": 2 * 1024 * 1024},
        webapp={"port": free_port()},
        training={"cpus": 1, "memory_gb": 2},
    )
    users = UserStore(settings.users_file)
    users.add("alice", PASSWORDS["alice"], "admin")
    users.add("bob", PASSWORDS["bob"], "user")
    with running_gateway(settings), running_webapp(settings) as url:
        yield url, settings


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()
