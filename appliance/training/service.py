"""Creating, listing and cancelling fine-tuning jobs; used by the gateway's API and the CLI.
A job is only queued once its base model and every line of its dataset have been checked."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from appliance.atomic_files import read_json_object, write_json
from appliance.config import ApplianceSettings
from appliance.config.training import Hyperparameters
from appliance.errors import ApplianceError
from appliance.lines import jsonl_lines
from appliance.models.catalog import Catalog, ModelSpec
from appliance.monitoring.training_metrics import eta_seconds
from appliance.serving.access import log_tail as tail
from appliance.slurm.client import SlurmClient, SlurmJob
from appliance.training.dataset import Dataset, parse_dataset
from appliance.training.examples import token_count
from appliance.training.jobs import (
    TrainingJob,
    job_dir,
    list_jobs,
    new_job_id,
    save_job,
)
from appliance.training.sbatch import JOB_NAME_INFIX, render_training_script

SUFFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
# States a job reports once it has ended for good.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class TrainingError(ApplianceError):
    """A fine-tuning job cannot be created or changed; the message says why."""


def base_model(settings: ApplianceSettings, catalog: Catalog, name: str) -> ModelSpec:
    """The catalog model `name` if it can be fine-tuned here."""
    spec = catalog.get(name)
    if spec is None:
        raise TrainingError(f"unknown model {name!r}")
    if spec.kind == "embedding" or spec.engine != "vllm":
        raise TrainingError(
            f"model {name} is an embedding model; only chat and completion models can be fine-tuned"
        )
    if spec.source_kind == "store":
        raise TrainingError(
            f"model {name} is held in the encrypted store; fine-tuning starts "
            "from a model's plain checkpoint (its import source)"
        )
    if not spec.installed(settings):
        raise TrainingError(f"model {name} is not installed on this appliance")
    return spec


def check_dataset(
    settings: ApplianceSettings, spec: ModelSpec, data: bytes, hp: Hyperparameters
) -> Dataset:
    """Every line checked, lengths counted with the base model's own tokenizer."""
    from transformers import AutoTokenizer

    if len(data) > settings.training.max_dataset_bytes:
        raise TrainingError(
            f"the dataset is {len(data)} bytes; the limit is {settings.training.max_dataset_bytes}"
        )
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir(settings))
    max_tokens = min(hp.max_seq_len, spec.max_model_len)
    return parse_dataset(
        data,
        count_tokens=lambda example: token_count(tokenizer, example.to_json()),
        max_tokens=max_tokens,
        eval_fraction=hp.eval_fraction,
        min_examples=settings.training.min_examples,
        seed=hp.seed,
    )


def hyperparameters(
    settings: ApplianceSettings, overrides: dict[str, Any] | None
) -> Hyperparameters:
    """The configured defaults with a job's own values on top (each checked)."""
    return Hyperparameters.model_validate(
        {**settings.training.defaults.model_dump(), **(overrides or {})}
    )


def _write_lines(path, examples) -> None:
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))


def prepare_job(
    settings: ApplianceSettings,
    catalog: Catalog,
    *,
    user: str,
    model: str,
    data: bytes,
    dataset_name: str = "",
    overrides: dict[str, Any] | None = None,
    suffix: str | None = None,
) -> TrainingJob:
    """Check everything, then write the job's folder (nothing is queued yet)."""
    spec = base_model(settings, catalog, model)
    hp = hyperparameters(settings, overrides)
    job_id = new_job_id()
    if suffix is not None and not SUFFIX.fullmatch(suffix):
        raise TrainingError("suffix: 1-24 lower-case letters, digits and '-'")
    output = f"{model}-ft-{suffix or job_id[3:9]}"
    if output in catalog or len(output) > 64:
        raise TrainingError(
            f"a model named {output} already exists or the name is too long; choose another suffix"
        )
    dataset = check_dataset(settings, spec, data, hp)
    job = TrainingJob(
        id=job_id,
        model=model,
        base_dir=str(spec.model_dir(settings)),
        output_model=output,
        user=user,
        hyperparameters=hp,
        format=dataset.format,
        train_examples=len(dataset.train),
        eval_examples=len(dataset.eval),
        dataset_name=dataset_name[:200],
    )
    directory = job_dir(settings, job_id)
    directory.mkdir(parents=True, mode=0o700)
    try:
        _write_lines(directory / "train.jsonl", dataset.train)
        _write_lines(directory / "eval.jsonl", dataset.eval)
        write_json(directory / "settings.json", settings.model_dump(mode="json"))
        os.chmod(directory / "settings.json", 0o600)
        save_job(settings, job)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)  # nothing half-made is left behind
        raise
    return job


def submit_job(
    settings: ApplianceSettings, catalog: Catalog, slurm: SlurmClient, job: TrainingJob
) -> TrainingJob:
    """Queue a prepared job on Slurm with the GPUs its base model needs (none on CPU)."""
    spec = catalog.get(job.model)
    gpus = settings.training.gpus
    if gpus is None:
        gpus = min(spec.resources.gpus, 1) if spec else 0
    # Host memory: on CPU the weights in float32 with room for activations; on a GPU node
    # the checkpoint passes through host memory once while loading.
    size = spec.size_gb if spec else 0
    mem_gb = settings.training.memory_gb + size * (4 if gpus == 0 else 1.5)
    try:
        job.slurm_job_id = slurm.submit(
            render_training_script(settings, job, gpus, int(mem_gb * 1024))
        )
    except BaseException:
        shutil.rmtree(job_dir(settings, job.id), ignore_errors=True)
        raise
    save_job(settings, job)
    return job


def create_job(
    settings: ApplianceSettings, catalog: Catalog, slurm: SlurmClient, **request: Any
) -> TrainingJob:
    """Check everything, write the job's folder and queue it on Slurm (see prepare_job)."""
    return submit_job(settings, catalog, slurm, prepare_job(settings, catalog, **request))


def training_slurm_jobs(settings: ApplianceSettings, slurm: SlurmClient) -> dict[int, SlurmJob]:
    prefix = f"{settings.cluster.name}{JOB_NAME_INFIX}"
    return {j.job_id: j for j in slurm.jobs(prefix)}


def job_view(settings: ApplianceSettings, job: TrainingJob, slurm_job: SlurmJob | None) -> dict:
    """The job as the API shows it: its record, live progress and a status that combines what
    the trainer wrote with what Slurm says."""

    directory = job_dir(settings, job.id)
    progress = read_json_object(directory / "progress.json") or {}
    state = progress.get("state")
    if job.cancelled:
        status = "cancelled"
    elif state in ("succeeded", "failed"):
        status = state
    elif slurm_job is not None and slurm_job.active:
        status = "queued" if slurm_job.state == "PENDING" else "running"
    elif slurm_job is not None:
        status = "failed"  # ended without the trainer saying it succeeded
    else:
        status = "queued" if state is None else "failed"
    return {
        **job.model_dump(mode="json", exclude={"base_dir"}),
        "object": "fine_tuning.job",
        "status": status,
        "trainer_state": state,
        "fine_tuned_model": job.output_model if status == "succeeded" else None,
        "progress": {
            k: progress.get(k)
            for k in (
                "step",
                "total_steps",
                "loss",
                "learning_rate",
                "tokens_per_s",
                "checkpoint_step",
                "resumes",
                "resumed_from",
                "base_eval_loss",
                "updated_at",
                "started_at",
            )
        },
        "eta_s": eta_seconds(progress) if status == "running" else None,
        "result": read_json_object(directory / "result.json"),
        "error": progress.get("error") if status == "failed" else None,
        "slurm": {
            "job_id": job.slurm_job_id,
            "state": slurm_job.state if slurm_job else None,
            "reason": slurm_job.reason if slurm_job else None,
        },
    }


def visible_jobs(settings: ApplianceSettings, user: str, admin: bool) -> list[TrainingJob]:
    return [j for j in list_jobs(settings) if admin or j.user == user]


def cancel_job(settings: ApplianceSettings, slurm: SlurmClient, job: TrainingJob) -> TrainingJob:
    """Stop the job (it checkpoints, then ends); a finished job is left as it is."""
    progress = read_json_object(job_dir(settings, job.id) / "progress.json") or {}
    if progress.get("state") in FINAL_STATES:
        raise TrainingError(f"job {job.id} has already {progress['state']}")
    job.cancelled = True
    save_job(settings, job)
    if job.slurm_job_id is not None:
        slurm.cancel(job.slurm_job_id)
    return job


def step_metrics(settings: ApplianceSettings, job: TrainingJob, limit: int = 2000) -> list[dict]:
    """Loss and learning rate per step; a resumed run's steps replace the ones it repeats."""
    path = job_dir(settings, job.id) / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    try:
        lines = jsonl_lines(path.read_text())
    except OSError:
        return []
    for line in lines:
        try:
            point = json.loads(line)
            by_step[int(point["step"])] = point
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    points = [by_step[s] for s in sorted(by_step)]
    stride = max(1, len(points) // limit)
    return points[::stride]


def log_tail(settings: ApplianceSettings, job: TrainingJob, lines: int = 40) -> str:
    return tail(job_dir(settings, job.id) / "train.log", lines)
