"""The program of a fine-tuning job on its node: `python -m appliance.training.run --job-dir D`.
Exit status 0: trained and published; 3: stopped by a signal after a checkpoint (Slurm requeues
or the job was cancelled); 2: the job cannot succeed (missing files); else: it died and may be
restarted from its last checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

from appliance.atomic_files import read_json_object, write_json
from appliance.config import load_settings
from appliance.training.jobs import TrainingJob
from appliance.training.publish import publish_tuned
from appliance.training.trainer import Stopped, Trainer

EX_INVALID = 2
EX_STOPPED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance.training.run")
    parser.add_argument("--job-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars redrawn in a log file are noise
    directory = args.job_dir
    job_data = read_json_object(directory / "job.json")
    settings_data = read_json_object(directory / "settings.json")
    if job_data is None or settings_data is None:
        print(f"no job.json or settings.json in {directory}", file=sys.stderr)
        return EX_INVALID
    job = TrainingJob.model_validate(job_data)
    settings = load_settings(**settings_data)
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = Trainer(job, directory, device)
    try:
        result = trainer.run()
        trainer.write_progress(state="publishing")
        spec = publish_tuned(settings, job, trainer.model)
    except Stopped as exc:
        print(str(exc), file=sys.stderr)
        return EX_STOPPED
    except Exception as exc:
        traceback.print_exc()
        trainer.write_progress(state="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    result["model"] = spec.name
    write_json(directory / "result.json", result)
    trainer.write_progress(state="succeeded", result=result)
    # The adapter's deltas are the tuned model minus the base: they go with the checkpoints,
    # now that the stored model holds them (encrypted).
    shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
