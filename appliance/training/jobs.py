"""A fine-tuning job's record and folder: <state_dir>/training/<id>/ holds job.json (this
record), settings.json (the stack's settings, for the job on its node), train.jsonl and
eval.jsonl (the checked examples), progress.json (written by the trainer, read by monitoring),
checkpoints/, result.json and train.log."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, Field

from appliance.atomic_files import read_json_object, write_json
from appliance.config import ApplianceSettings
from appliance.config.training import Hyperparameters

JOB_ID = re.compile(r"^ft-[0-9a-f]{12}$")


class TrainingJob(BaseModel):
    """What was asked for, by whom, and the Slurm job that runs it."""

    id: str = Field(pattern=JOB_ID.pattern)
    model: str
    base_dir: str
    output_model: str
    user: str
    created_at: float = Field(default_factory=time.time)
    hyperparameters: Hyperparameters
    format: str
    train_examples: int
    eval_examples: int
    dataset_name: str = ""
    slurm_job_id: int | None = None
    cancelled: bool = False


def new_job_id() -> str:
    return "ft-" + secrets.token_hex(6)


def job_dir(settings: ApplianceSettings, job_id: str) -> Path:
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a training job id: {job_id!r}")
    return settings.training_dir / job_id


def save_job(settings: ApplianceSettings, job: TrainingJob) -> None:
    write_json(job_dir(settings, job.id) / "job.json", job.model_dump(mode="json"))


def load_job(settings: ApplianceSettings, job_id: str) -> TrainingJob | None:
    try:
        data = read_json_object(job_dir(settings, job_id) / "job.json")
    except ValueError:
        return None
    return TrainingJob.model_validate(data) if data else None


def list_jobs(settings: ApplianceSettings) -> list[TrainingJob]:
    jobs = []
    for path in settings.training_dir.glob("ft-*/job.json"):
        data = read_json_object(path)
        if data:
            jobs.append(TrainingJob.model_validate(data))
    return sorted(jobs, key=lambda j: j.created_at, reverse=True)
