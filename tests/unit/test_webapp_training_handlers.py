"""The Training tab's handlers without a browser: the jobs table, starting a job from a dataset,
cancelling and the log."""

from __future__ import annotations

import gradio as gr
import pytest

from appliance.webapp import training_view as training
from tests.unit.webapp_fakes import REFUSED, USER, FakeClient, context, given, run

RUNNING = {
    "id": "ft-1",
    "model": "tiny-chat",
    "status": "running",
    "progress": {"step": 3, "total_steps": 10, "loss": 1.23456, "learning_rate": 0.0002}
    | {"tokens_per_s": 812.4, "base_eval_loss": 2.5},
    "eta_s": 120,
}
DONE = {
    "id": "ft-0",
    "model": "tiny-chat",
    "status": "failed",
    "error": "out of memory",
    "progress": {"step": None, "total_steps": None},
    "result": {"base_eval_loss": 2.5, "tuned_eval_loss": 1.25},
    "fine_tuned_model": "tiny-chat:ft-0",
}
MODELS = [
    {"id": "tiny-chat", "kind": "chat", "installed": True},
    {"id": "embed", "kind": "embedding", "installed": True},
    {"id": "big", "kind": "chat", "installed": False},
]


def test_job_rows_show_progress_and_the_held_out_evaluation():
    running, done = training.job_rows([RUNNING, DONE])
    assert running == [
        *["ft-1", "tiny-chat", "running", "3 / 10", "1.2346", "2.00e-04", "812", "2.0 min"],
        *["2.500 → …", ""],
    ]
    assert done[2:4] == ["failed (out of memory)", "0 / ?"]  # no steps known
    assert done[4:] == ["", "", "", "", "2.500 → 1.250", "tiny-chat:ft-0"]


def test_refresh_lists_tunable_models_and_the_chosen_jobs_loss():
    metrics = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    client = FakeClient(models=MODELS, fine_tunes=[RUNNING, DONE], fine_tune_metrics=metrics)
    base, rows, pick, plot = run(training.refresh(context(client), USER, None))
    assert given(base) == {"choices": ["tiny-chat"]} and len(rows) == 2
    assert given(pick) == {"choices": ["ft-1", "ft-0"], "value": "ft-1"}
    assert plot.to_dict("list") == {"step": [1, 2], "loss": [2.0, 1.5]}
    no_metrics = FakeClient(models=MODELS, fine_tunes=[RUNNING], fine_tune_metrics=REFUSED)
    assert run(training.refresh(context(no_metrics), USER, "ft-1"))[3] is None


def test_start_uploads_the_dataset_and_queues_the_job(tmp_path):
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("{}\n")
    queued = {"id": "ft-2", "train_examples": 9, "eval_examples": 1, "output_model": "m:support"}
    client = FakeClient(upload_dataset={"id": "file-1"}, create_fine_tune=queued)
    shown = run(
        training.start(
            context(client), USER, "tiny-chat", str(dataset), " support ", 2, 5, 1e-4, 4, 8
        )
    )
    assert shown.startswith("**ft-2** queued: 9 training and 1 held-out examples.")
    ((_, body),) = client.called("create_fine_tune")
    assert body == {
        "model": "tiny-chat",
        "training_file": "file-1",
        "hyperparameters": {"epochs": 2, "learning_rate": 1e-4, "batch_size": 4, "lora_rank": 8}
        | {"max_steps": 5},
        "suffix": "support",
    }
    with pytest.warns(UserWarning, match="Choose a base model and a dataset"):
        assert (
            run(training.start(context(client), USER, None, None, "", 1, 0, 1, 1, 1)) == gr.skip()
        )


def test_a_refused_dataset_is_shown_and_the_log_opens():
    refused = context(FakeClient(upload_dataset=REFUSED))
    with pytest.raises(gr.Error, match="not allowed"):
        run(training.start(refused, USER, "tiny-chat", "/nonexistent.jsonl", "", 1, 0, 1, 1, 1))
    ctx = context(FakeClient(fine_tune_log=""))
    assert given(run(training.show_log(ctx, USER, "ft-1"))) == {
        "value": "(nothing logged yet)",
        "visible": True,
    }
    assert given(run(training.show_log(ctx, USER, None))) == {"visible": False}
