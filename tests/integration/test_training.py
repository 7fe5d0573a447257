"""Fine-tuning end to end on the local Slurm cluster with the tiny model (`lora: true`): datasets
with problems are refused with line numbers; a job trains, is killed in the middle and resumes
from its checkpoint, is requeued (as on preemption) and resumes again, beats the base model on
the held-out examples, lands encrypted in the store as a LoRA adapter and answers through the
gateway on the base model's instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance.store.format import HEADER_FILE
from appliance_dev.stack import running_gateway, write_config
from tests.slurm_fixtures import stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]
SAMPLE = Path(__file__).parents[2] / "examples" / "fine-tune-sample.jsonl"


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training")
    catalog = tiny_catalog(tiny_model_dir).replace(
        "    max_model_len: 512\n", "    max_model_len: 512\n    lora: true\n"
    )
    settings = stack_settings(slurm_cluster, tmp, catalog, training={"cpus": 1, "memory_gb": 2})
    with running_gateway(settings) as url:
        yield settings, url


def upload(url: str, data: bytes, name: str = "data.jsonl") -> httpx.Response:
    return httpx.post(
        url + "/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"}, timeout=60
    )


def test_datasets_with_problems_are_refused_with_line_numbers(stack):
    settings, url = stack
    lines = SAMPLE.read_text().splitlines()[:6]
    lines[1] = '{"messages": [{"role": "user", "content": "hi"}'  # cut short
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]})
    lines[4] = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    )
    refused = upload(url, "\n".join(lines).encode())
    assert refused.status_code == 400
    details = refused.json()["error"]["details"]
    assert [d.split(":")[0] for d in details] == ["line 2", "line 3", "line 5"], details
    assert "no role" in details[1] and "empty" in details[2]
    assert not list((settings.training_dir / "files").glob("*.jsonl"))  # nothing was kept

    # Lengths are counted with the model's tokenizer when a job is made from the file.
    long = json.loads(lines[0])
    long["messages"][-1]["content"] = "the pump " * 400
    data = "\n".join([*SAMPLE.read_text().splitlines()[:6], json.dumps(long)]).encode()
    file_id = upload(url, data).json()["id"]
    made = httpx.post(
        url + "/v1/fine_tuning/jobs",
        timeout=60,
        json={"model": "tiny-chat", "training_file": file_id},
    )
    assert made.status_code == 400, made.text
    (problem,) = made.json()["error"]["details"]
    assert problem.startswith("line 7: ") and "tokens, more than the 512 allowed" in problem
    assert not list(settings.training_dir.glob("ft-*"))  # nothing was queued


def trainer_pid(job_dir: Path) -> int | None:
    found = subprocess.run(
        ["pgrep", "-f", f"appliance.training.run --job-dir {job_dir}"],
        capture_output=True,
        text=True,
    )
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


def test_a_job_resumes_after_a_kill_and_a_requeue_and_its_model_answers(stack):
    settings, url = stack
    file_id = upload(url, SAMPLE.read_bytes(), "maintenance.jsonl").json()["id"]
    hp = {"max_steps": 240, "learning_rate": 1e-3, "checkpoint_every": 20, "batch_size": 4}
    made = httpx.post(
        url + "/v1/fine_tuning/jobs",
        timeout=120,
        json={
            "model": "tiny-chat",
            "training_file": file_id,
            "hyperparameters": hp,
            "suffix": "maint",
        },
    )
    assert made.status_code == 200, made.text
    job = made.json()
    assert job["fine_tuned_model"] is None and job["output_model"] == "tiny-chat-ft-maint"
    job_dir = settings.training_dir / job["id"]

    def get() -> dict:
        return httpx.get(url + f"/v1/fine_tuning/jobs/{job['id']}", timeout=30).json()

    # Killed (as by the OOM killer) after a checkpoint: the job restarts the trainer.
    wait_for(lambda: (get()["progress"]["checkpoint_step"] or 0) >= 20, 180, "a checkpoint")
    os.kill(trainer_pid(job_dir), signal.SIGKILL)
    wait_for(lambda: (get()["progress"]["resumes"] or 0) >= 1, 120, "the trainer to resume")
    # Requeued (as on preemption): it checkpoints on Slurm's signal and resumes in the new run.
    slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
    step_before = get()["progress"]["step"]
    subprocess.run(
        ["scontrol", "requeue", str(job["slurm"]["job_id"])],
        check=True,
        env={**os.environ, "SLURM_CONF": str(settings.slurm_conf)},
    )
    wait_for(lambda: (get()["progress"]["resumes"] or 0) >= 2, 300, "the requeued job to resume")
    assert get()["progress"]["resumed_from"] >= step_before - 20

    done = wait_for(
        lambda: (v := get())["status"] in ("succeeded", "failed") and v, 600, "the job to finish"
    )
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["tuned_eval_loss"] < result["base_eval_loss"], result
    log = (job_dir / "train.log").read_text()
    assert "restart 1 of 3 from the last checkpoint" in log
    assert not (job_dir / "checkpoints").exists()  # the deltas went with the success
    assert (settings.store_root / "tiny-chat-ft-maint" / HEADER_FILE).exists()
    header = json.loads((settings.store_root / "tiny-chat-ft-maint" / HEADER_FILE).read_text())
    assert header["encrypted"] is True
    wait_for(
        lambda: not ((j := slurm.job(job["slurm"]["job_id"])) and j.active),
        60,
        "the Slurm job to end",
    )

    # Exported to monitoring, labelled with the job.
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert f'appliance_training_step{{job_id="{job["id"]}"' in metrics
    models = {m["id"]: m for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
    assert models["tiny-chat-ft-maint"]["base_model"] == "tiny-chat"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
    messages = [
        {"role": "system", "content": "You are the plant's maintenance assistant."},
        {"role": "user", "content": "Tell me about the spare parts."},
    ]
    tuned = client.chat.completions.create(
        model="tiny-chat-ft-maint", max_tokens=16, temperature=0, messages=messages
    )
    base = client.chat.completions.create(
        model="tiny-chat", max_tokens=16, temperature=0, messages=messages
    )
    assert tuned.model == "tiny-chat-ft-maint" and tuned.choices[0].message.content.strip()
    assert tuned.choices[0].message.content != base.choices[0].message.content
    # Both answered by one instance of the base model.
    (inst,) = httpx.get(url + "/admin/instances", timeout=30).json()["instances"]
    assert inst["model"] == "tiny-chat" and inst["served"] == 2


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    config = write_config(settings, settings.state_dir / "cli-config.yaml")
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cli_refuses_a_bad_dataset_and_cancels_a_job(stack, tmp_path):
    settings, url = stack
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*SAMPLE.read_text().splitlines()[:5], "not json"]))
    refused = cli(settings, "train", "start", "tiny-chat", str(bad))
    assert refused.returncode != 0 and "line 6: not valid JSON" in refused.stderr, refused

    started = cli(settings, "train", "start", "tiny-chat", str(SAMPLE), "--max-steps", "5000")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.split()[0]
    get = lambda: httpx.get(url + f"/v1/fine_tuning/jobs/{job_id}", timeout=30).json()  # noqa: E731
    wait_for(lambda: (get()["progress"]["step"] or 0) >= 3, 180, "the job to train")
    cancelled = cli(settings, "train", "cancel", job_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
    slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
    slurm_id = get()["slurm"]["job_id"]
    wait_for(lambda: not ((j := slurm.job(slurm_id)) and j.active), 60, "the Slurm job to end")
    view = get()
    # It stopped on Slurm's signal after writing a checkpoint, and is not requeued.
    assert view["status"] == "cancelled" and view["trainer_state"] == "stopped", view
    assert (settings.training_dir / job_id / "checkpoints").exists()
    listed = cli(settings, "train", "list")
    assert job_id in listed.stdout and "cancelled" in listed.stdout
