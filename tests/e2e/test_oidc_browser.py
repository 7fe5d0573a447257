"""Browser sign-in through a real OIDC provider (oidc-provider-mock, started here): the sign-in
button, the provider's form, back to the web app signed in as that user, who sees the knowledge
base shared with the group the provider says they are in. Gateway and web app only."""

from __future__ import annotations

import re

import httpx
import pytest
from appliance.security.secret_files import write_secret_file
from playwright.sync_api import expect

from appliance_dev.stack import free_port, running_gateway, running_webapp
from tests.oidc_provider import CLIENT_ID, running_provider
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm]
expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def oidc_stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    """(web app URL, gateway URL, provider) with sign-in through the provider only."""
    tmp = tmp_path_factory.mktemp("oidc-web")
    secret = tmp / "client-secret"
    write_secret_file(secret, b"any secret: the provider takes any for an unregistered client")
    port = free_port()
    with running_provider() as provider:
        provider.set_user("alice", {"preferred_username": "alice", "groups": ["it-admins"]})
        provider.set_user("bob", {"preferred_username": "bob", "groups": ["engineering"]})
        identity = {
            "sources": ["oidc"],
            "oidc": {
                "issuer": provider.issuer,
                "client_id": CLIENT_ID,
                "client_secret_file": str(secret),
                "display_name": "Example SSO",
            },
            "mapping": {"admin_groups": ["it-admins"], "groups": {"engineering": ["eng"]}},
        }
        settings = stack_settings(
            slurm_cluster,
            tmp,
            tiny_catalog(tiny_model_dir),
            identity=identity,
            webapp={"port": port, "public_url": f"http://127.0.0.1:{port}"},
        )
        with running_gateway(settings) as gateway, running_webapp(settings) as web:
            yield web, gateway, provider


def test_sign_in_with_the_provider_shows_the_groups_knowledge_base(oidc_stack, browser, artifacts):
    web, gateway, provider = oidc_stack
    alice = {"authorization": f"Bearer {provider.tokens('alice')['access_token']}"}
    with httpx.Client(base_url=gateway, headers=alice, timeout=300) as http:
        assert http.post("/v1/knowledge_bases", json={"name": "handbook"}).is_success
        doc = [("files", ("leave.md", b"# Leave\n\nTaken in August.\n", "text/markdown"))]
        assert http.post("/v1/knowledge_bases/handbook/documents", files=doc).is_success
        share = {"groups": ["eng"]}
        assert http.post("/v1/knowledge_bases/handbook/share", json=share).is_success

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(web)
        sign_in = page.locator("#oidc-sign-in")
        expect(sign_in).to_contain_text("Sign in with Example SSO")
        sign_in.click()
        page.wait_for_url(re.compile(re.escape(f"{provider.issuer}/oauth2/authorize?")))
        page.locator("input[name=sub]").fill("bob")
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(re.compile(re.escape(f"{web}/?signin=")))
        expect(page.locator("#who")).to_contain_text("Signed in as bob")
        expect(page.locator("#sign-in")).to_be_hidden()
        page.get_by_role("tab", name="Knowledge").click()
        page.locator("#kb-select input").click()
        expect(page.get_by_role("option", name="handbook")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("#kb-info")).to_contain_text("groups: eng")
        expect(page.locator("#kb-documents")).to_contain_text("leave.md")
        page.screenshot(path=str(artifacts / "oidc-signed-in.png"))

        # The sign-in stays across a reload (the one-time code in the URL is spent by then).
        page.reload()
        expect(page.locator("#who")).to_contain_text("Signed in as bob")
        page.locator("#sign-out").click()
        expect(page.locator("#oidc-sign-in")).to_be_visible()
    finally:
        context.close()


def test_a_forged_callback_is_refused(oidc_stack):
    web, _, _ = oidc_stack
    resp = httpx.get(f"{web}/oidc/callback", params={"code": "x", "state": "made-up"}, timeout=30)
    assert resp.status_code == 400 and "unknown or has expired" in resp.text
    resp = httpx.get(f"{web}/oidc/callback", params={"error": "access_denied"}, timeout=30)
    assert resp.status_code == 400 and "did not sign you in" in resp.text
