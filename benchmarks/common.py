"""Shared by the benchmarks: machine description, result files and printed tables."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from appliance.security.node_tls import internal_ca

from appliance.config import ApplianceSettings
from appliance.lines import iter_sse_lines
from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists
from appliance_dev.stack import (
    free_port,
    local_cluster_settings,
    running_gateway,
    running_local_cluster,
    tiny_model_cache_dir,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
# The tiny model shared with the tests (built on first use).
TINY = tiny_model_cache_dir()
MODEL = "tiny-chat"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "gpu": None,
    }


def percentile(values: list[float], q: float) -> float:
    """q in 0..100, linear interpolation (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def first_text_chunk(url: str, body: dict, timeout: float) -> tuple[float, float]:
    """A chat request (`body`, streamed) timed as its client sees it: (wall-clock time it was
    sent, seconds to the first chunk with text: the role chunk before it has none). The rest is
    read, so the instance is idle afterwards; an HTTP error or an error event raises."""
    sent, t0 = time.time(), time.perf_counter()
    request = {**body, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=timeout) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.read().decode(errors='replace')}")
        lines = iter_sse_lines(resp)
        for line in lines:
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                elapsed = time.perf_counter() - t0
                for _ in lines:
                    pass
                return sent, elapsed
    raise RuntimeError("stream ended without a token")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def order_balanced(ratios: list[float]) -> float:
    """The median over consecutive pairs of rounds (each pair ran both orders: rounds alternate
    which side goes first) of the pair's geometric mean. Where going first costs something, a
    plain median of an odd number of rounds takes the order that ran more often; a pair cancels
    the order out."""
    pairs = [math.sqrt(a * b) for a, b in zip(ratios[::2], ratios[1::2], strict=False)]
    return median(pairs)


def write_result(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        **data,
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[tuple]) -> None:
    """rows[0] is the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{title}")
    for n, r in enumerate(rows):
        print("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


@contextlib.contextmanager
def tiny_stack(prefix: str) -> Iterator[str]:
    """A one-node local Slurm cluster and a gateway serving only the tiny model (instances are
    never retired while the benchmark runs); yields the gateway's URL; stops everything."""
    with tiny_cluster_stack(prefix) as (url, _settings):
        yield url


@contextlib.contextmanager
def tiny_cluster_stack(
    prefix: str, nodes: int = 1, max_instances: int = 1, gateway: dict | None = None, **sections
) -> Iterator[tuple[str, ApplianceSettings]]:
    """Like tiny_stack, with `nodes` nodes and up to `max_instances` instances of the tiny
    model, and `gateway` settings merged in; yields (gateway URL, settings)."""
    if not tiny_model_exists(TINY):
        build_tiny_model(TINY)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        catalog = Path(tmp) / "catalog.yaml"
        catalog.write_text(
            f"models:\n  - name: {MODEL}\n    source: dir:{TINY}\n    max_model_len: 512\n"
            f"    max_instances: {max_instances}\n    resources: {{cpus: 1, memory_gb: 4}}\n"
        )
        settings = local_cluster_settings(
            Path(tmp) / "state",
            nodes=nodes,
            gateway={"port": free_port(), "idle_timeout_s": 0, **(gateway or {})},
            catalog={"files": [str(catalog)], "include_presets": False},
            **sections,
        )
        with (
            running_local_cluster(settings),
            running_gateway(settings) as url,
            trusting_instances(settings),
        ):
            yield url, settings


@contextlib.contextmanager
def trusting_instances(settings: ApplianceSettings) -> Iterator[None]:
    """Let this benchmark's own clients reach instances directly while the stack runs: they
    serve HTTPS with certificates of the stack's internal CA (made when its gateway or store
    service started), and httpx's default verification reads SSL_CERT_FILE. Put back after:
    the CA goes with the stack's temporary folder, and every client a later stack makes, even
    for plain HTTP, would fail to load the missing file. Benchmarks reach gateways over plain
    HTTP."""
    before = os.environ.get("SSL_CERT_FILE")
    ca = internal_ca(settings).cert
    if ca.exists():
        os.environ["SSL_CERT_FILE"] = str(ca)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = before
