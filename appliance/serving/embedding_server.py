"""A small OpenAI-compatible embeddings server (sentence-transformers), run as an instance job."""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time

# At module level: FastAPI resolves the route's `Request` annotation from the module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from appliance import envs


def build_app(model_name: str, model_path: str, device: str, max_seq_length: int):
    """The FastAPI app: /health, /v1/models and /v1/embeddings."""
    os.environ.update(envs.OFFLINE_ENV)
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device)
    model.max_seq_length = min(max_seq_length, model.max_seq_length or max_seq_length)
    tokenizer = model.tokenizer
    print("appliance: weights loaded", flush=True)
    app = FastAPI(title=f"embeddings: {model_name}")
    created = int(time.time())

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        body = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
        return JSONResponse({"error": body}, status_code=status)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "appliance"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "request body is not valid JSON")
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return error(400, "'input' must be a string or a non-empty list of strings", "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return error(400, "encoding_format must be 'float' or 'base64'", "encoding_format")
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
        data = []
        for i, vec in enumerate(vectors):
            vec = np.asarray(vec, dtype=np.float32)
            value = base64.b64encode(vec.tobytes()).decode() if fmt == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(tokenizer.encode(t)) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model_name, "usage": usage}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-seq-length", type=int, default=256)
    # vLLM's names for them, so the launcher passes both engines the same flags.
    p.add_argument("--ssl-certfile", default=None, help="Serve HTTPS with this certificate.")
    p.add_argument("--ssl-keyfile", default=None, help="The certificate's key.")
    args = p.parse_args(argv)
    print("appliance: embedding server process started", flush=True)
    import uvicorn

    app = build_app(args.model, args.model_path, args.device, args.max_seq_length)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
