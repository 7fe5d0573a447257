"""The installer's plan (`--dry-run` output) and every file it writes, for hardware captured on
real machines (tests/unit/testdata/hardware/README.md): golden files under
tests/unit/golden/installer/<case>/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from appliance.installer.files import written_files
from appliance.installer.hardware import RecordedProbe, detect, parse_df, parse_gpus
from appliance.installer.options import parse
from appliance.installer.plan import make_plan
from appliance.installer.profile import (
    choose_profile,
    fit_presets,
    host_tier_gib,
    load_presets,
    proposed_models,
)

from appliance.config.cluster import ClusterSettings
from appliance.config.monitoring import MonitoringSettings
from appliance.config.serving import ServingSettings
from appliance.config.store import StoreSettings
from appliance.layout import LocalClusterPaths
from appliance.slurm.conf import (
    HealthCheck,
    HostFacts,
    render_cgroup_conf,
    render_gres_conf,
    render_slurm_conf,
)
from tests.golden import GOLDEN, UPDATE, check_golden

HARDWARE = Path(__file__).parent / "testdata" / "hardware"

CASES = {
    "cpu-only": ("cpu-only", ["--offline"]),
    "h100x1": ("h100x1", []),
    "h200x8": ("h200x8", []),
    # No systemd: `appliance supervise` keeps the services (and the node's standby) up.
    "h200-container": ("h200-container", []),
    "two-node-head": ("gpu01", ["--role", "head", "--worker", "gpu02:8"]),
    "two-node-worker": (
        "gpu02",
        ["--role", "worker", "--head", "gpu01", "--munge-key", "/root/munge.key"],
    ),
}


def _plan(case: str):
    capture, argv = CASES[case]
    probe = RecordedProbe.load(HARDWARE / f"{capture}.json")
    options = parse(["--dry-run", *argv])
    return make_plan(options, detect(probe), probe, online=True)


def _local_slurm_files(plan) -> dict[str, str]:
    """What `appliance cluster up` writes for this installation's configuration."""
    config = yaml.safe_load(next(t for p, _w, t in written_files(plan) if p.name == "config.yaml"))
    cluster = ClusterSettings(**config["cluster"])
    hw = plan.hardware
    facts = HostFacts(
        hostname=hw.hostname,
        cpus=hw.cpus,
        real_memory_mb=hw.memory_mib,
        gpu_devices=tuple(f"/dev/nvidia{g.index}" for g in hw.gpus),
    )
    slurm_dir = plan.layout.state / "slurm"
    health = HealthCheck(
        LocalClusterPaths(slurm_dir).health_check, MonitoringSettings().health_interval_s
    )
    files = {
        "slurm.conf": render_slurm_conf(cluster, slurm_dir, facts, health),
        "gres.conf": render_gres_conf(cluster, slurm_dir, facts),
    }
    files["cgroup.conf"] = render_cgroup_conf(cluster.cgroups)
    return files


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_and_files_match_golden(case: str):
    plan = _plan(case)
    check_golden(f"installer/{case}/plan.txt", plan.render())
    expected = set()
    for path, _what, text in written_files(plan):
        if text is None:
            continue
        name = str(path).lstrip("/").replace("/", "__")
        expected.add(name)
        check_golden(f"installer/{case}/{name}", text)
    if plan.profile.local_cluster:
        for name, text in _local_slurm_files(plan).items():
            expected.add(f"local-cluster__{name}")
            check_golden(f"installer/{case}/local-cluster__{name}", text)
    on_disk = {p.name for p in (GOLDEN / "installer" / case).iterdir()} - {"plan.txt"}
    if not UPDATE:
        assert on_disk == expected, "stale or missing golden files"


def test_profiles_follow_the_hardware():
    assert _plan("cpu-only").profile.name == "cpu-demo"
    gpu = _plan("h100x1")
    assert gpu.profile.name == "gpu-server" and gpu.profile.munge and gpu.profile.cgroups
    assert gpu.python_steps[0] == ["torch==2.11.0"]
    assert _plan("two-node-head").profile.name == "head"
    worker = _plan("two-node-worker")
    assert worker.profile.name == "worker" and not worker.profile.services


def test_gpu_hosts_start_instances_through_a_standby_per_gpu_node():
    server = _plan("h100x1").profile
    assert server.standby and server.standby_nodes == ("n1",)
    head, worker = _plan("two-node-head").profile, _plan("two-node-worker").profile
    assert head.standby and head.standby_nodes == ("gpu01",)  # slurmd -Z: the host's name
    assert worker.standby and worker.standby_nodes == ("gpu02",)
    cpu = _plan("cpu-only").profile
    assert not cpu.standby and not cpu.standby_nodes
    # A head without GPUs writes its GPU workers' job scripts: they use the workers' standbys.
    hw = detect(RecordedProbe.load(HARDWARE / "cpu-only.json"))
    head = choose_profile(hw, parse(["--role", "head", "--worker", "gpu02:8"]))
    assert head.standby and not head.standby_nodes
    assert not choose_profile(hw, parse(["--role", "head", "--worker", "cpu02"])).standby
    worker = choose_profile(hw, parse(["--role", "worker", "--head", "gpu01"]))
    assert not worker.standby and not worker.standby_nodes
    for case in ("h100x1", "two-node-head", "h200-container"):
        config = next(t for p, _w, t in written_files(_plan(case)) if p.name == "config.yaml")
        serving = ServingSettings(**yaml.safe_load(config)["serving"])
        assert serving.standby and serving.standby_nodes == list(_plan(case).profile.standby_nodes)


def test_host_tier_is_a_quarter_of_memory_and_holds_an_8b_model():
    assert host_tier_gib(24.7) == host_tier_gib(63.9) == 0  # too little memory to lock any
    assert host_tier_gib(64) == 15  # a quarter is 14.9 GiB: one 8B model (16.1 GB) needs 15
    assert host_tier_gib(135.1) == 31  # h100x1: 125.8 GiB
    assert host_tier_gib(2164) == 503  # h200x8


def _written(case: str) -> dict[str, str]:
    return {p.name: t for p, _w, t in written_files(_plan(case)) if t is not None}


def test_each_gpu_node_runs_its_store_service_with_a_host_tier():
    for case, after, tier in (
        ("h100x1", "appliance-cluster.service", 31),
        ("two-node-head", "slurmd.service", 503),
        ("two-node-worker", "slurmd.service", 503),
    ):
        files = _written(case)
        unit = files["appliance-store@.service"]
        command = "/opt/appliance/venv/bin/appliance --config /etc/appliance/config.yaml"
        assert f"ExecStart={command} store serve --node %i\n" in unit
        assert f"After={after}\n" in unit
        assert "Restart=on-failure\n" in unit and "LimitMEMLOCK=infinity\n" in unit
        # The standby's unit is the same template with its own command and kill mode.
        standby = files["appliance-standby@.service"]
        assert f"After={after}\n" in standby and "KillMode=process\n" in standby
        assert "KillMode" not in unit
        store = StoreSettings(**yaml.safe_load(files["config.yaml"])["store"])
        assert store.host_cache_gib == tier == _plan(case).profile.host_cache_gib
        assert not store.services  # https://<node address>:<service_port> reaches each node
    # A container (no systemd): the supervisor runs it; the tier is configured all the same.
    config = yaml.safe_load(_written("h200-container")["config.yaml"])
    assert config["store"] == {"host_cache_gib": 31}
    cpu = _written("cpu-only")
    assert "appliance-store@.service" not in cpu and "store" not in yaml.safe_load(
        cpu["config.yaml"]
    )


def test_presets_are_sized_to_gpu_memory():
    presets = load_presets()
    h100 = detect(RecordedProbe.load(HARDWARE / "h100x1.json"))
    fits = {f.name: f.fits for f in fit_presets(presets, h100)}
    # 80 GB at 0.9 utilisation: 14B models fit, the 70B one needs 4 GPUs.
    assert fits["qwen2.5-14b-instruct"] and fits["phi-4"]
    assert not fits["llama-3.3-70b-instruct"]
    h200x8 = detect(RecordedProbe.load(HARDWARE / "h200x8.json"))
    fitting = fit_presets(presets, h200x8)
    assert all(f.fits for f in fitting)
    profile = choose_profile(h200x8, parse([]))
    assert proposed_models(fitting, profile) == ["llama-3.3-70b-instruct"]


def test_offline_without_a_directory_builds_the_tiny_model():
    capture, _ = CASES["h100x1"]
    probe = RecordedProbe.load(HARDWARE / f"{capture}.json")
    plan = make_plan(parse(["--dry-run", "--offline"]), detect(probe), probe, online=False)
    assert [m.name for m in plan.models] == ["tiny-chat", "all-minilm-l6-v2"]
    assert any("needs the model hub" in w for w in plan.warnings)


def test_offline_directory_import(tmp_path):
    (tmp_path / "Qwen2.5-7B-Instruct").mkdir()
    (tmp_path / "Qwen2.5-7B-Instruct" / "config.json").write_text("{}")
    probe = RecordedProbe.load(HARDWARE / "h100x1.json")
    argv = ["--dry-run", "--models-dir", str(tmp_path), "--models", "qwen2.5-7b-instruct,phi-4"]
    plan = make_plan(parse(argv), detect(probe), probe, online=False)
    origins = {m.name: m.origin for m in plan.models}
    assert origins["qwen2.5-7b-instruct"] == f"dir:{tmp_path / 'Qwen2.5-7B-Instruct'}"
    assert "phi-4" not in origins and any("phi-4 not found" in w for w in plan.warnings)


def test_bad_requests_are_refused_before_anything_changes():
    probe = RecordedProbe.load(HARDWARE / "cpu-only.json")
    hw = detect(probe)
    plan = make_plan(parse(["--dry-run", "--models", "gpt-9"]), hw, probe, online=False)
    assert plan.blockers == ["unknown preset(s): gpt-9"]
    worker = make_plan(parse(["--dry-run", "--role", "worker", "--head", "h"]), hw, probe, False)
    assert any("--munge-key" in b for b in worker.blockers)
    with pytest.raises(SystemExit):
        parse(["--role", "worker"])  # a worker needs its head


def test_detection_parsers():
    gpus, driver = parse_gpus(
        "0, NVIDIA H100 80GB HBM3, 81559, 00000000:18:00.0, 580.159.04\n"
        "1, NVIDIA H100 80GB HBM3, 81559, 00000000:2A:00.0, 580.159.04\n"
    )
    assert [g.kind for g in gpus] == ["h100", "h100"] and driver == "580.159.04"
    assert round(gpus[0].memory_gb, 1) == 85.5
    assert parse_gpus(None) == ((), None)
    disks = parse_df(
        "Filesystem Type 1-blocks Used Available Capacity Mounted on\n"
        "/dev/vda ext4 1000 10 990 1% /\n"
        "tmpfs tmpfs 64 0 64 0% /run\n"
        "overlay overlay 500 0 500 0% /var/lib/docker/x\n"
    )
    assert [d.mount for d in disks] == ["/", "/var/lib/docker/x"]
