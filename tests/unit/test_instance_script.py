"""Instance batch scripts (golden files) and the Slurm request behind them."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.errors import ApplianceError
from appliance.models.catalog import ModelResources, ModelSpec
from appliance.models.resources import plan_request
from appliance.serving.job_script import model_from_job_name, render_instance_script
from appliance.store.keyring import load_spec
from appliance.store.lora import lora_store_json
from tests.golden import check_golden


def settings(**extra):
    return load_settings(
        state_dir="/var/lib/appliance",
        serving={"python": "/opt/appliance/.venv/bin/python", **extra.pop("serving", {})},
        **extra,
    )


TINY = ModelSpec(
    name="tiny-chat",
    source="builtin:tiny",
    max_model_len=512,
    resources=ModelResources(cpus=1, memory_gb=4, cpu_fallback=True),
)
SMALL_GPU = ModelSpec(
    name="small",
    source="hf:x/small",
    max_model_len=4096,
    resources=ModelResources(gpus=1, gpu_memory_gb=16, memory_gb=16, cpus=2),
)
BIG = ModelSpec(
    name="big-70b",
    source="hf:x/big",
    max_model_len=8192,
    vllm_args=["--dtype", "bf16"],
    resources=ModelResources(gpus=4, gpu_memory_gb=300, memory_gb=128, cpus=16),
)


@pytest.mark.parametrize(
    ("spec", "gpus", "golden"),
    [
        (TINY, 0, "instance-cpu.sbatch"),
        (SMALL_GPU, 2, "instance-shard.sbatch"),
        (BIG, 8, "instance-multi-gpu.sbatch"),
    ],
)
def test_instance_script_golden(spec, gpus, golden):
    s = settings()
    req = plan_request(spec, s, gpus)
    check_golden(golden, render_instance_script(s, spec, req, Path(f"/models/{spec.name}")))


def test_gpu_instances_run_with_nvlink_multicast_off():
    # A tensor-parallel or shard instance: NCCL must not use NVLink multicast (docs/gpu.md).
    for spec, gpus in ((BIG, 8), (SMALL_GPU, 2)):
        script = render_instance_script(
            settings(), spec, plan_request(spec, settings(), gpus), Path("/models/m")
        )
        assert "export NCCL_NVLS_ENABLE=0 " in script
        assert script.index("NCCL_NVLS_ENABLE") < script.index("exec ")
    cpu = render_instance_script(
        settings(), TINY, plan_request(TINY, settings(), 0), Path("/models/m")
    )
    assert "NCCL_NVLS_ENABLE" not in cpu


def test_small_model_shares_gpu_with_matching_memory_fraction():
    req = plan_request(SMALL_GPU, settings(), cluster_gpus=1)
    assert req.gres == "shard:1"  # 16 of 80 GB, 4 shards per GPU
    assert req.gpu_memory_utilization == pytest.approx(0.225)


def test_large_model_takes_whole_gpus():
    assert plan_request(BIG, settings(), cluster_gpus=8).gres == "gpu:4"


def test_gpu_model_on_cpu_cluster():
    with pytest.raises(ApplianceError, match="needs 1 GPU"):
        plan_request(SMALL_GPU, settings(), cluster_gpus=0)
    fallback = SMALL_GPU.model_copy(
        update={"resources": SMALL_GPU.resources.model_copy(update={"cpu_fallback": True})}
    )
    assert plan_request(fallback, settings(), cluster_gpus=0).gres is None


def test_too_many_gpus_for_any_node():
    with pytest.raises(ApplianceError, match="largest node has 2"):
        plan_request(BIG, settings(), cluster_gpus=2)


def test_job_names_round_trip():
    s = settings()
    assert model_from_job_name(s, "appliance-inst-tiny-chat") == "tiny-chat"
    assert model_from_job_name(s, "somebody-elses-job") is None


@pytest.mark.parametrize(
    ("serving", "golden"),
    [
        ({}, "instance-store.sbatch"),
        # A GPU server as the installer sets it up: through the node's standby, engines kept.
        ({"standby": True, "keep_engines": "gpu"}, "instance-store-kept.sbatch"),
    ],
)
def test_stored_model_script_golden(tmp_path, serving, golden):
    """A model from the encrypted store, pinned to the node placement chose: the launcher gets
    what it needs to open it."""
    stored = ModelSpec(
        name="secret-8b",
        source="store:secret-8b",
        resources=ModelResources(gpus=1, gpu_memory_gb=20, memory_gb=32, cpus=4),
    )
    s = settings(
        store={
            "signing_key_file": str(tmp_path / "absent.key"),
            "trusted_signers": ["ab" * 32],
        },
        serving=serving,
    )
    req = plan_request(stored, s, 2)
    check_golden(
        golden,
        render_instance_script(
            s,
            stored,
            req,
            stored.model_dir(s),
            nodelist="n2",
            store_spec=load_spec(s, stored.name).to_json(),
        ),
    )


def test_lora_model_script_golden(tmp_path):
    """A model whose instances serve its LoRA adapters from the store: vLLM's LoRA flags, and
    what the launcher needs to open adapters."""
    base = ModelSpec(
        name="chat-8b",
        source="hf:x/chat-8b",
        lora=True,
        resources=ModelResources(gpus=1, gpu_memory_gb=20, memory_gb=32, cpus=4),
    )
    s = settings(
        store={"signing_key_file": str(tmp_path / "absent.key"), "trusted_signers": ["cd" * 32]}
    )
    req = plan_request(base, s, 2)
    script = render_instance_script(
        s, base, req, Path("/models/chat-8b"), lora_store=lora_store_json(s, base.name)
    )
    check_golden("instance-lora.sbatch", script)
    adapter = ModelSpec(name="chat-8b-ft-x", source="store:chat-8b-ft-x", base_model="chat-8b")
    assert adapter.serving_model == "chat-8b" and base.serving_model == "chat-8b"


@pytest.mark.parametrize("encrypted", [False, True])
def test_flags_that_log_prompts_are_left_out_while_data_is_encrypted_at_rest(encrypted):
    logging = ["--enable-log-requests", "--enable-log-outputs"]
    s = settings(
        serving={"extra_vllm_args": [*logging, "--seed", "1"]},
        security={"data_at_rest": {"enabled": encrypted}},
    )
    script = render_instance_script(s, TINY, plan_request(TINY, s, 0), Path("/models/tiny-chat"))
    assert "--seed 1" in script
    assert all((flag in script) != encrypted for flag in logging)
