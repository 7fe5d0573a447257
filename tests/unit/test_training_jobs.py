"""Fine-tuning pieces that need no cluster: dataset checks with line numbers, the split, the
order of batches across a resume, the job's status from its files and Slurm, and the sbatch
script (golden file)."""

from __future__ import annotations

import json
import time

import pytest

from appliance.atomic_files import write_json
from appliance.config import load_settings
from appliance.slurm.records import SlurmJob
from appliance.training.dataset import DatasetError, parse_dataset
from appliance.training.files import save_dataset
from appliance.training.jobs import TrainingJob, job_dir, save_job
from appliance.training.sbatch import render_training_script
from appliance.training.service import hyperparameters, job_view, step_metrics
from appliance.training.trainer import Encoded, batch_at, read_examples, total_steps
from tests.golden import check_golden


def chat(question: str, answer: str) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
    )


GOOD = [chat(f"question {i}", f"answer {i}") for i in range(10)]


def problems(lines: list[str], **kw) -> list[str]:
    with pytest.raises(DatasetError) as err:
        parse_dataset("\n".join(lines).encode(), **kw)
    return err.value.problems


def test_each_kind_of_problem_is_named_with_its_line():
    lines = [
        *GOOD[:2],
        '{"messages": [',  # 3
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}),  # 4
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),  # 5
        chat("hi", "   "),  # 6
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # 7: no answer
        json.dumps({"prompt": "a", "completion": "b"}),  # 8: the other format
        "[1, 2]",  # 9
        json.dumps({"text": "x"}),  # 10
        *GOOD[2:],
    ]
    found = problems(lines)
    assert [p.split(":")[0] for p in found] == [f"line {n}" for n in range(3, 11)]
    assert "not valid JSON" in found[0] and "no role" in found[1] and "'robot'" in found[2]
    assert "empty" in found[3] and "assistant's answer" in found[4] and "one format" in found[5]


def test_blank_lines_are_skipped_and_line_numbers_stay_true():
    found = problems([GOOD[0], "", "", "{bad", *GOOD[1:]])
    assert found == [
        "line 4: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    ]


def test_unicode_line_breaks_inside_strings_do_not_split_an_example(tmp_path):
    # Exports written with ensure_ascii=False carry U+2028 and U+0085 raw inside strings;
    # str.splitlines() took them for line ends and refused the halves as broken JSON.
    odd = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "a\u2028b"},
                {"role": "assistant", "content": "c\u0085d"},
            ]
        },
        ensure_ascii=False,
    )
    assert "\u2028" in odd
    data = "\r\n".join([odd, *GOOD[:4]]).encode()  # lines ended with CRLF, as on Windows
    dataset = parse_dataset(data)
    examples = dataset.train + dataset.eval
    assert len(examples) == 5
    (first,) = [e for e in examples if e.line == 1]
    assert [m["content"] for m in first.messages] == ["a\u2028b", "c\u0085d"]
    meta = save_dataset(load_settings(state_dir=str(tmp_path)), "alice", "odd.jsonl", data)
    assert meta["examples"] == 5
    # The trainer reads its examples back the same way.
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"prompt": "x\u2028y", "completion": "z"}, ensure_ascii=False) + "\n"
    )
    (encoded,) = read_examples(path, CharTokenizer())
    assert encoded.ids == [ord(c) for c in "x\u2028yz"]


class CharTokenizer:
    """One token per character."""

    eos_token = ""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_over_long_examples_and_too_few_examples():
    found = problems(GOOD, count_tokens=lambda e: 900 if e.line == 3 else 10, max_tokens=512)
    assert found == ["line 3: 900 tokens, more than the 512 allowed"]
    assert "at least 4" in problems(GOOD[:3])[0]
    assert problems([b"\xff".decode("latin-1")], min_examples=1)  # not UTF-8 after encode


def test_a_broken_export_is_reported_briefly():
    with pytest.raises(DatasetError) as err:
        parse_dataset(b"x\n" * 500)
    assert len(err.value.problems) == 50 and "showing 50 of 500" in str(err.value)


def test_the_split_is_deterministic_and_holds_out_at_least_one():
    data = "\n".join(GOOD).encode()
    a, b = parse_dataset(data, seed=3), parse_dataset(data, seed=3)
    assert [e.line for e in a.eval] == [e.line for e in b.eval] and len(a.eval) == 1
    assert len(a.train) == 9 and not {e.line for e in a.train} & {e.line for e in a.eval}
    prompts = "\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(8))
    assert parse_dataset(prompts.encode()).format == "completion"


def test_a_resumed_run_sees_the_same_batches():
    examples = [Encoded([i], [i]) for i in range(10)]
    first = [[e.ids[0] for e in batch_at(s, examples, 4, seed=1)] for s in range(8)]
    again = [[e.ids[0] for e in batch_at(s, examples, 4, seed=1)] for s in range(5, 8)]
    assert first[5:] == again
    # Each epoch covers every example once.
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    hp = hyperparameters(load_settings(), {"epochs": 2, "batch_size": 4})
    assert total_steps(hp, 10) == 5
    assert total_steps(hyperparameters(load_settings(), {"max_steps": 7}), 10) == 7


def test_hyperparameters_out_of_range_are_refused():
    with pytest.raises(ValueError, match="learning_rate"):
        hyperparameters(load_settings(), {"learning_rate": 5})
    with pytest.raises(ValueError, match="extra"):
        hyperparameters(load_settings(), {"warp_speed": 9})


def make_job(tmp_path, **extra) -> tuple:
    settings = load_settings(state_dir=str(tmp_path))
    job = TrainingJob(
        id="ft-0123456789ab",
        model="tiny-chat",
        base_dir="/m",
        user="alice",
        output_model="tiny-chat-ft-x",
        format="chat",
        train_examples=9,
        eval_examples=1,
        slurm_job_id=42,
        hyperparameters=hyperparameters(settings, {}),
        **extra,
    )
    job_dir(settings, job.id).mkdir(parents=True)
    save_job(settings, job)
    return settings, job


def slurm(state: str) -> SlurmJob:
    return SlurmJob(job_id=42, name="x-train-ft", state=state)


def test_status_combines_the_trainer_and_slurm(tmp_path):
    settings, job = make_job(tmp_path)
    assert job_view(settings, job, slurm("PENDING"))["status"] == "queued"
    progress = job_dir(settings, job.id) / "progress.json"
    now = time.time()
    write_json(
        progress,
        {
            "state": "running",
            "step": 10,
            "total_steps": 40,
            "loss": 2.0,
            "started_at": now - 10,
            "updated_at": now,
        },
    )
    view = job_view(settings, job, slurm("RUNNING"))
    assert view["status"] == "running" and view["eta_s"] == pytest.approx(30, abs=1)
    # The job ended and the trainer never said it succeeded (killed past its restarts).
    assert job_view(settings, job, slurm("FAILED"))["status"] == "failed"
    write_json(progress, {"state": "succeeded", "step": 40, "total_steps": 40})
    done = job_view(settings, job, None)
    assert done["status"] == "succeeded" and done["fine_tuned_model"] == "tiny-chat-ft-x"
    job.cancelled = True
    write_json(progress, {"state": "stopped"})
    assert job_view(settings, job, slurm("CANCELLED"))["status"] == "cancelled"


def test_repeated_steps_of_a_resumed_run_replace_the_earlier_ones(tmp_path):
    settings, job = make_job(tmp_path)
    points = [(1, 3.0), (2, 2.5), (3, 2.4), (2, 2.6), (3, 2.3), (4, 2.0)]
    lines = [json.dumps({"step": s, "loss": v, "learning_rate": 1e-4}) for s, v in points]
    (job_dir(settings, job.id) / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5,')
    assert [(p["step"], p["loss"]) for p in step_metrics(settings, job)] == [
        (1, 3.0),
        (2, 2.6),
        (3, 2.3),
        (4, 2.0),
    ]


def test_training_script_golden():
    settings = load_settings(
        state_dir="/var/lib/appliance", serving={"python": "/opt/appliance/.venv/bin/python"}
    )
    job = TrainingJob(
        id="ft-0123456789ab",
        model="small",
        base_dir="/models/small",
        user="alice",
        output_model="small-ft-x",
        format="chat",
        train_examples=90,
        eval_examples=10,
        hyperparameters=hyperparameters(settings, {}),
    )
    check_golden("training-gpu.sbatch", render_training_script(settings, job, 1, 24576))
