"""The in-job launcher builds the right server command for each engine and device."""

from __future__ import annotations

from pathlib import Path

from appliance.serving import launch
from appliance.serving.endpoint import InstanceEndpoint, read_endpoint, write_endpoint
from appliance.serving.launch import Launcher, parse_args, server_command, server_env, sleeps
from appliance.slurm.records import gpu_count

BASE = [
    "--model",
    "m",
    "--model-path",
    "/models/m",
    "--endpoint-dir",
    "/tmp/e",
    "--max-model-len",
    "512",
    "--cpu-kv-cache-gib",
    "1.5",
]


def test_vllm_cpu_command_and_env():
    args = parse_args(
        [*BASE, "--enforce-eager", "--gpu-memory-utilization", "0.4", "--", "--dtype", "float32"]
    )
    cmd = server_command(args, 1234, "cpu")
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "m"
    assert cmd[cmd.index("--port") + 1] == "1234"
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--dtype", "float32"]
    assert "--gpu-memory-utilization" not in cmd  # meaningless on CPU
    env = server_env(args, "cpu")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1.5"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"


def test_vllm_gpu_command():
    args = parse_args([*BASE, "--gpu-memory-utilization", "0.45", "--tensor-parallel-size", "2"])
    cmd = server_command(args, 1, "cuda")
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.45"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert "VLLM_CPU_KVCACHE_SPACE" not in server_env(args, "cuda")


def test_gpu_env_sampler_and_compile_cache_per_node(monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "gpu07")
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    args = parse_args([*BASE, "--compile-cache-dir", "/var/lib/appliance/cache/vllm"])
    env = server_env(args, "cuda")
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"  # no JIT compile on a machine's first start
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"  # the engine skips the imports
    assert env["VLLM_CACHE_ROOT"] == "/var/lib/appliance/cache/vllm/gpu07"
    cpu = server_env(args, "cpu")
    assert "VLLM_USE_FLASHINFER_SAMPLER" not in cpu and "VLLM_CACHE_ROOT" not in cpu
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in cpu


def test_sleep_mode_on_gpu_and_where_asked():
    """`gpu`: vLLM's sleep mode and its endpoints on CUDA only; `always`: the endpoints on CPU
    too (vLLM's CPU backend refuses --enable-sleep-mode and ignores a sleep); never for the
    embedding server."""
    gpu = parse_args([*BASE, "--sleep-mode", "gpu"])
    assert "--enable-sleep-mode" in server_command(gpu, 1, "cuda")
    assert server_env(gpu, "cuda")["VLLM_SERVER_DEV_MODE"] == "1"
    assert not sleeps(gpu, "cpu") and "VLLM_SERVER_DEV_MODE" not in server_env(gpu, "cpu")
    always = parse_args([*BASE, "--sleep-mode", "always"])
    assert sleeps(always, "cpu") and "--enable-sleep-mode" not in server_command(always, 1, "cpu")
    assert server_env(always, "cpu")["VLLM_SERVER_DEV_MODE"] == "1"
    assert not sleeps(parse_args(BASE), "cuda")
    embed = parse_args([*BASE, "--engine", "sentence-transformers", "--sleep-mode", "always"])
    assert not sleeps(embed, "cuda")


def test_embedding_command():
    args = parse_args([*BASE, "--engine", "sentence-transformers"])
    cmd = server_command(args, 99, "cpu")
    assert cmd[1:3] == ["-m", "appliance.serving.embedding_server"]


def test_a_standby_is_used_only_where_it_answers_and_can_name_the_job_s_gpus(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    socket = tmp_path / "standby-n2.sock"
    args = parse_args([*BASE, "--standby-socket", str(tmp_path / "standby-{node}.sock")])
    launcher = Launcher(args)
    cmd = server_command(args, 1, "cuda")
    started = []
    monkeypatch.setattr(
        launch.StandbyServer,
        "start",
        lambda path, argv, env, keep=None: started.append((path, env)),
    )
    assert launcher._from_standby(args, cmd, {}) is None and not started  # no standby on n2
    socket.touch()
    monkeypatch.setattr(launch, "env_outside_the_job", lambda env: None)
    assert launcher._from_standby(args, cmd, {}) is None and not started  # GPUs unnamable
    monkeypatch.setattr(launch, "env_outside_the_job", lambda env: {**env, "OUTSIDE": "1"})
    launcher._from_standby(args, cmd, {"A": "b"})
    assert started == [(socket, {"A": "b", "OUTSIDE": "1"})]


def test_endpoint_file_roundtrip(tmp_path: Path):
    assert read_endpoint(tmp_path, 7) is None
    (tmp_path / "8.json").write_text("{half")
    assert read_endpoint(tmp_path, 8) is None  # garbage is "not yet", never a crash
    ep = InstanceEndpoint(
        job_id=7, model="m", host="127.0.0.1", port=5, pid=1, phases={"ready_at": 2.0}
    )
    write_endpoint(tmp_path, ep)
    assert read_endpoint(tmp_path, 7) == ep
    assert ep.url == "http://127.0.0.1:5"


def test_gpu_count_from_gres():
    assert gpu_count("gpu:2,shard:8") == 2
    assert gpu_count("gpu:a100:4(S:0-1)") == 4
    assert gpu_count("(null)") == 0
    assert gpu_count("") == 0


def test_tls_flags_and_https_endpoint(tmp_path, monkeypatch):
    """With --tls-dir both engines get the node's certificate, and the endpoint is HTTPS."""
    from appliance.security.internal_ca import InternalCa

    ca = InternalCa(tmp_path / "tls")
    ca.ensure()
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    for engine in ("vllm", "sentence-transformers"):
        args = parse_args([*BASE, "--engine", engine, "--tls-dir", str(ca.root)])
        launcher = Launcher(args)
        cmd = server_command(args, launcher.port, "cpu", launcher.tls)
        i = cmd.index("--ssl-certfile")
        assert cmd[i : i + 4] == [
            "--ssl-certfile",
            str(ca.node_cert("n1")),
            "--ssl-keyfile",
            str(ca.node_key("n1")),
        ]
        assert launcher.endpoint.url.startswith("https://127.0.0.1:")
        assert launcher.probe_url.startswith("https://")


def test_no_certificate_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """A node with neither its certificate nor the CA's key to issue one: the launcher says so
    and exits, rather than starting a server the gateway would refuse."""
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    code = launch.main([*BASE, "--tls-dir", str(tmp_path / "tls")])
    assert code == launch.NO_CERTIFICATE
    assert "appliance: cannot serve TLS: no certificate for node n7" in capsys.readouterr().out
