"""Fine-tuning throughput: LoRA on the tiny model with the appliance's own trainer (the code a
Slurm job runs), on the CPU and, where there is one, on the GPU, in the same run. The baseline
is the CPU run; each device's tokens/s is reported as a ratio to it, with the held-out loss of
base and tuned model to show both runs learnt the same thing.

Run: .venv/bin/python -m benchmarks.training_speed [--steps 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from appliance.atomic_files import read_json_object
from appliance.config import load_settings
from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists
from appliance.models.catalog import Catalog, ModelSpec
from appliance.training.jobs import job_dir
from appliance.training.service import prepare_job
from appliance.training.trainer import Trainer
from benchmarks.common import TINY, print_table, write_result

SAMPLE = Path(__file__).parents[1] / "examples" / "fine-tune-sample.jsonl"


def train_on(device: str, steps: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="appliance-train-bench-") as tmp:
        settings = load_settings(state_dir=tmp, catalog={"include_presets": False})
        spec = ModelSpec(name="tiny-chat", source=f"dir:{TINY}", max_model_len=512)
        job = prepare_job(
            settings,
            Catalog([spec]),
            user="bench",
            model="tiny-chat",
            data=SAMPLE.read_bytes(),
            overrides={
                "max_steps": steps,
                "batch_size": batch_size,
                "learning_rate": 1e-3,
                "checkpoint_every": steps,
            },
        )
        directory = job_dir(settings, job.id)
        started = time.monotonic()
        result = Trainer(job, directory, device).run()
        wall = time.monotonic() - started
        progress = read_json_object(directory / "progress.json") or {}
    return {
        "device": device,
        "steps": steps,
        "batch_size": batch_size,
        "tokens_per_s": progress["tokens_per_s"],
        "wall_s": round(wall, 2),
        "base_eval_loss": result["base_eval_loss"],
        "tuned_eval_loss": result["tuned_eval_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if not tiny_model_exists(TINY):
        build_tiny_model(TINY)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = [train_on(d, args.steps, args.batch_size) for d in devices]
    baseline = runs[0]["tokens_per_s"]
    rows = [("device", "steps", "tokens/s", "ratio to CPU", "wall s", "held-out loss")]
    for r in runs:
        r["ratio_to_cpu"] = round(r["tokens_per_s"] / baseline, 2)
        rows.append(
            (
                r["device"],
                r["steps"],
                r["tokens_per_s"],
                r["ratio_to_cpu"],
                r["wall_s"],
                f"{r['base_eval_loss']:.3f} -> {r['tuned_eval_loss']:.3f}",
            )
        )
    print_table("LoRA fine-tuning of the tiny model (the appliance's trainer)", rows)
    extra = {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    path = write_result(
        "training_speed", {"runs": runs, "cpu_threads": torch.get_num_threads(), **extra}
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
