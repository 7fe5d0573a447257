"""The sbatch script of a fine-tuning job. The trainer runs under a small supervisor: a trainer
that dies (killed, out of memory) is restarted from its last checkpoint up to
`training.max_restarts` times; Slurm's signals (cancel, preemption, requeue) are passed on so
it checkpoints first; `--requeue` lets Slurm start a preempted job again, where it resumes."""

from __future__ import annotations

import shlex

from appliance.config import ApplianceSettings
from appliance.training.jobs import TrainingJob, job_dir
from appliance.training.run import EX_INVALID, EX_STOPPED

JOB_NAME_INFIX = "-train-"


def training_job_name(settings: ApplianceSettings, job_id: str) -> str:
    return f"{settings.cluster.name}{JOB_NAME_INFIX}{job_id}"


def render_training_script(
    settings: ApplianceSettings, job: TrainingJob, gpus: int, mem_mb: int
) -> str:
    q = shlex.quote
    directory = job_dir(settings, job.id)
    cfg = settings.training
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={training_job_name(settings, job.id)}",
        f"#SBATCH --partition={settings.cluster.partition}",
        f"#SBATCH --output={directory / 'train.log'}",
        "#SBATCH --open-mode=append",  # a requeued run adds to the log instead of replacing it
        f"#SBATCH --chdir={directory}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cfg.cpus}",
        f"#SBATCH --mem={mem_mb}M",
    ]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    lines += [
        f"#SBATCH --comment=appliance-training:{job.id}",
        "#SBATCH --requeue",
        "",
        "# Checkpoints, adapters and the log are the service account's alone, whatever umask",
        "# sbatch was called under.",
        "umask 077",
        f"trainer=({q(str(settings.serving.python))} -m appliance.training.run "
        f"--job-dir {q(str(directory))})",
        "child=",
        "# Slurm's TERM (cancel, preemption) and USR1 reach the trainer, which checkpoints first.",
        'forward() { [ -n "$child" ] && kill -"$1" "$child" 2>/dev/null; }',
        "trap 'forward TERM' TERM",
        "trap 'forward USR1' USR1",
        "restarts=0",
        "while :; do",
        '    "${trainer[@]}" &',
        "    child=$!",
        "    # wait returns early when a trapped signal arrives: wait until the trainer has ended.",
        '    while wait "$child"; status=$?; kill -0 "$child" 2>/dev/null; do :; done',
        "    child=",
        f'    case $status in 0|{EX_INVALID}|{EX_STOPPED}) exit "$status";; esac',
        f'    if [ "$restarts" -ge {cfg.max_restarts} ]; then',
        '        echo "appliance: the trainer died (status $status); no restarts left" >&2',
        '        exit "$status"',
        "    fi",
        "    restarts=$((restarts + 1))",
        '    echo "appliance: the trainer died (status $status); restart $restarts of '
        f'{cfg.max_restarts} from the last checkpoint" >&2',
        "done",
    ]
    return "\n".join(lines) + "\n"
