"""The web app's own upload and download endpoints (Gradio's) serve signed-in users only, within
the gateway's upload limit. Real gateway, real web app, plain HTTP."""

from __future__ import annotations

import httpx
import pytest
from appliance.security.secret_files import read_secret_file
from appliance.security.users import UserStore

from appliance.webapp.files_guard import COOKIE, seal
from appliance.webapp.server import SECRET_BYTES
from appliance_dev.stack import free_port, running_gateway, running_webapp
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm]
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def web(slurm_cluster, tiny_model_dir, tmp_path_factory):
    settings = stack_settings(
        slurm_cluster,
        tmp_path_factory.mktemp("webfiles"),
        tiny_catalog(tiny_model_dir),
        rag={"max_upload_bytes": LIMIT},
        webapp={"port": free_port()},
    )
    UserStore(settings.users_file).add("bob", "bob-password-1")
    with running_gateway(settings) as gateway_url, running_webapp(settings) as url:
        secret = read_secret_file(settings.layout.browser_secret, size=SECRET_BYTES, what="s")
        yield url, gateway_url, secret.decode()


def sign_in(gateway_url: str, secret: str) -> tuple[str, dict[str, str]]:
    """Bob's session token, and the cookie the page sets for it (app.py: SET_COOKIE_JS)."""
    account = httpx.post(
        gateway_url + "/v1/auth/sign_in",
        json={"username": "bob", "password": "bob-password-1"},
        timeout=30,
    ).json()
    return account["token"], {COOKIE: seal(secret, account["token"])}


def upload(url: str, data: bytes, cookies: dict | None = None) -> httpx.Response:
    files = {"files": ("notes.txt", data, "text/plain")}
    return httpx.post(url + "/gradio_api/upload", files=files, cookies=cookies, timeout=30)


def test_anonymous_uploads_and_downloads_are_refused(web):
    url, gateway_url, secret = web
    refused = upload(url, b"anonymous file hosting")
    assert refused.status_code == 401, refused.text
    assert "sign in" in refused.json()["error"]["message"]
    # A forged cookie is no sign-in either.
    assert upload(url, b"x", {COOKIE: seal("f" * 32, "anything")}).status_code == 401

    _token, cookies = sign_in(gateway_url, secret)
    stored = upload(url, b"a document for the knowledge base", cookies)
    assert stored.status_code == 200, stored.text
    (path,) = stored.json()
    file_url = f"{url}/gradio_api/file={path}"
    assert httpx.get(file_url, cookies=cookies, timeout=30).status_code == 200
    anonymous = httpx.get(file_url, timeout=30)
    assert anonymous.status_code == 401 and b"knowledge base" not in anonymous.content
    assert httpx.get(f"{url}//gradio_api//file={path}", timeout=30).status_code in (401, 404)


def test_an_upload_over_the_gateway_limit_is_413(web):
    url, gateway_url, secret = web
    too_big = upload(url, b"x" * (LIMIT + 1024), sign_in(gateway_url, secret)[1])
    assert too_big.status_code == 413, too_big.text


def test_signing_out_ends_the_cookie(web):
    url, gateway_url, secret = web
    token, cookies = sign_in(gateway_url, secret)
    assert upload(url, b"before", cookies).status_code == 200
    headers = {"authorization": f"Bearer {token}"}
    httpx.post(gateway_url + "/v1/auth/sign_out", headers=headers, timeout=30)
    assert upload(url, b"after", cookies).status_code == 401
