"""slurm.conf / gres.conf rendering (golden files) and host detection from captured output.

Golden files: tests/golden.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config.cluster import ClusterSettings
from appliance.errors import ApplianceError
from appliance.slurm.conf import (
    HealthCheck,
    HostFacts,
    detect_host_facts,
    node_memory_mb,
    parse_nvidia_smi_l,
    parse_slurmd_c,
    plan_cluster,
    render_cgroup_conf,
    render_gres_conf,
    render_health_check_script,
    render_slurm_conf,
)
from appliance.slurm.prolog import render_prolog_script
from appliance.slurm.runner import CommandError
from tests.golden import check_golden
from tests.unit.slurm_replay import TESTDATA, ReplayRunner, capture

SLURM_DIR = Path("/var/lib/appliance/slurm")
HOST = HostFacts(hostname="gpu-host", cpus=16, real_memory_mb=64000)

CASES = {
    # One CPU-only node, everything else default.
    "slurm-1node-cpu": (ClusterSettings(nodes=1, gpus_per_node=0), HOST),
    # Two nodes with two simulated GPUs each, shared through 4 shards per GPU.
    "slurm-2node-2gpu-shards": (
        ClusterSettings(
            name="lab",
            partition="gpu",
            nodes=2,
            gpus_per_node=2,
            shards_per_gpu=4,
            cpus_per_node=8,
            controller_port=26817,
            node_port_base=27001,
            kill_wait_s=10,
        ),
        HOST,
    ),
    # Real GPUs (as nvidia-smi lists them) split over two nodes, no sharing.
    "slurm-2node-real-gpus": (
        ClusterSettings(nodes=2, gpus_per_node=1, shards_per_gpu=0, memory_mb_per_node=30000),
        HostFacts(
            hostname="dgx",
            cpus=64,
            real_memory_mb=512000,
            gpu_devices=tuple(f"/dev/nvidia{i}" for i in range(4)),
        ),
    ),
    # Slurm unpacked into a folder (benchmarks/gpu/slurm_unpack.sh): its plugin directory.
    "slurm-1node-plugin-dir": (
        ClusterSettings(plugin_dir=Path("/tmp/slurm/usr/lib/x86_64-linux-gnu/slurm-wlm")),
        HOST,
    ),
}


HEALTH = HealthCheck(SLURM_DIR / "healthcheck.sh", 60)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    cluster, facts = CASES[case]
    check_golden(f"{case}.slurm.conf", render_slurm_conf(cluster, SLURM_DIR, facts, HEALTH))
    check_golden(f"{case}.gres.conf", render_gres_conf(cluster, SLURM_DIR, facts))


def test_golden_cgroup_conf_without_confinement():
    check_golden("cgroup-unconfined.conf", render_cgroup_conf(confine=False))


def test_golden_health_check_script():
    script = render_health_check_script(
        "/opt/appliance/.venv/bin/python", SLURM_DIR / "health-config.yaml"
    )
    check_golden("healthcheck.sh", script)


def test_golden_prolog_script_and_its_line():
    drop = '/opt/appliance/bin/appliance standby drop --gpus "$SLURM_JOB_GPUS"'
    check_golden("prolog.sh", render_prolog_script(drop))
    cluster, facts = CASES["slurm-2node-real-gpus"]
    conf = render_slurm_conf(cluster, SLURM_DIR, facts, HEALTH, SLURM_DIR / "prolog.sh")
    assert f"\nProlog={SLURM_DIR}/prolog.sh\n" in conf
    assert "Prolog" not in render_slurm_conf(cluster, SLURM_DIR, facts, HEALTH)


def test_simulated_gpus_are_separate_devices_per_node():
    cluster, facts = CASES["slurm-2node-2gpu-shards"]
    layout = plan_cluster(cluster, SLURM_DIR, facts)
    assert layout.simulated_gpus and layout.sharing
    assert [n.gpu_files for n in layout.nodes] == [
        (f"{SLURM_DIR}/dev/n1/gpu0", f"{SLURM_DIR}/dev/n1/gpu1"),
        (f"{SLURM_DIR}/dev/n2/gpu0", f"{SLURM_DIR}/dev/n2/gpu1"),
    ]
    assert [n.port for n in layout.nodes] == [27001, 27002]


def test_real_gpus_replace_simulated_ones_and_are_split_between_nodes():
    cluster, facts = CASES["slurm-2node-real-gpus"]
    layout = plan_cluster(cluster, SLURM_DIR, facts)
    assert not layout.simulated_gpus
    assert [n.gpu_files for n in layout.nodes] == [
        ("/dev/nvidia0", "/dev/nvidia1"),
        ("/dev/nvidia2", "/dev/nvidia3"),
    ]


def test_more_nodes_than_real_gpus_is_refused():
    facts = HostFacts("h", 8, 32000, gpu_devices=("/dev/nvidia0",))
    with pytest.raises(ApplianceError, match=r"cluster\.nodes"):
        plan_cluster(ClusterSettings(nodes=2), SLURM_DIR, facts)


def test_node_memory_never_exceeds_what_slurmd_reports():
    assert node_memory_mb(ClusterSettings(), HOST) == 64000 - 2048
    assert node_memory_mb(ClusterSettings(memory_mb_per_node=8000), HOST) == 8000
    assert node_memory_mb(ClusterSettings(memory_mb_per_node=999999), HOST) == 64000
    small = HostFacts("h", 1, 3000)
    assert node_memory_mb(ClusterSettings(), small) == 1500


def test_more_cpus_than_the_host_has_is_refused():
    with pytest.raises(ApplianceError, match=r"cluster.cpus_per_node is 32 .* 16 CPUs"):
        plan_cluster(ClusterSettings(cpus_per_node=32), SLURM_DIR, HOST)


def test_parse_captured_slurmd_c():
    name, cpus, memory = parse_slurmd_c(capture("slurmd_C").stdout)
    assert name and cpus >= 1 and memory > 0


def test_parse_captured_nvidia_smi():
    assert parse_nvidia_smi_l((TESTDATA / "nvidia-smi-L.h200.txt").read_text()) == [0]
    assert parse_nvidia_smi_l("") == []


def test_detect_host_facts_without_nvidia_driver():
    runner = ReplayRunner().replay("slurmd_C")
    runner.answer(["nvidia-smi", "-L"], CommandError(["nvidia-smi", "-L"], "program not found"))
    facts = detect_host_facts(runner, user="alice")
    name, cpus, memory = parse_slurmd_c(capture("slurmd_C").stdout)
    assert facts == HostFacts(hostname=name, cpus=cpus, real_memory_mb=memory, user="alice")


def test_detect_host_facts_with_a_real_gpu():
    smi = capture("slurmd_C")
    smi = type(smi)(["nvidia-smi", "-L"], 0, (TESTDATA / "nvidia-smi-L.h200.txt").read_text(), "")
    runner = ReplayRunner().replay("slurmd_C").answer(["nvidia-smi", "-L"], smi)
    assert detect_host_facts(runner).gpu_devices == ("/dev/nvidia0",)
