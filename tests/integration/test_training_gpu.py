"""Fine-tuning on a real GPU (run on the device machine with `pytest -m gpu`): the trainer of a
prepared job uses CUDA in bf16, beats the base model on the held-out examples, and the merged
result lands encrypted in the store; the job's script asks Slurm for the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from appliance.atomic_files import read_json_object
from appliance.config import load_settings
from appliance.models.catalog import Catalog, ModelResources, ModelSpec
from appliance.store.format import HEADER_FILE
from appliance.training import run
from appliance.training.jobs import job_dir
from appliance.training.sbatch import render_training_script
from appliance.training.service import prepare_job

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
SAMPLE = Path(__file__).parents[2] / "examples" / "fine-tune-sample.jsonl"


def test_lora_fine_tuning_on_the_gpu(tmp_path, tiny_model_dir):
    settings = load_settings(state_dir=str(tmp_path / "state"), catalog={"include_presets": False})
    spec = ModelSpec(
        name="tiny-chat",
        source=f"dir:{tiny_model_dir}",
        max_model_len=512,
        resources=ModelResources(gpus=1, gpu_memory_gb=1),
    )
    job = prepare_job(
        settings,
        Catalog([spec]),
        user="alice",
        model="tiny-chat",
        data=SAMPLE.read_bytes(),
        suffix="gpu",
        overrides={"max_steps": 60, "learning_rate": 1e-3},
    )
    assert "#SBATCH --gres=gpu:1" in render_training_script(settings, job, 1, 4096)
    assert run.main(["--job-dir", str(job_dir(settings, job.id))]) == 0
    progress = read_json_object(job_dir(settings, job.id) / "progress.json")
    assert progress["device"] == "cuda" and progress["state"] == "succeeded"
    result = progress["result"]
    assert result["tuned_eval_loss"] < result["base_eval_loss"], result
    header = json.loads((settings.store_root / "tiny-chat-ft-gpu" / HEADER_FILE).read_text())
    assert header["encrypted"] is True
    print(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(),
                **result,
                "tokens_per_s": progress["tokens_per_s"],
            }
        )
    )
