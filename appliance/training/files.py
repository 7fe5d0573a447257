"""Uploaded datasets (OpenAI's `/v1/files` with purpose "fine-tune"): kept under
<state_dir>/training/files/ with their owner, structure-checked on upload; lengths are checked
against a model's tokenizer when a job is created from them."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

from appliance.atomic_files import read_json_object, write_json
from appliance.config import ApplianceSettings
from appliance.training.dataset import parse_dataset

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


def files_dir(settings: ApplianceSettings) -> Path:
    return settings.training_dir / "files"


def save_dataset(settings: ApplianceSettings, user: str, filename: str, data: bytes) -> dict:
    """Check every line (DatasetError names them), then keep the file; its file object."""
    dataset = parse_dataset(data, min_examples=settings.training.min_examples)
    directory = files_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    file_id = "file-" + secrets.token_hex(12)
    fd = os.open(directory / f"{file_id}.jsonl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    meta = {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": int(time.time()),
        "filename": os.path.basename(filename)[:200],
        "purpose": "fine-tune",
        "user": user,
        # Counted by the parser that accepted them: a line count of its own could disagree.
        "examples": len(dataset.train) + len(dataset.eval),
    }
    write_json(directory / f"{file_id}.json", meta)
    return meta


def dataset_file(settings: ApplianceSettings, file_id: str, user: str, admin: bool):
    """(file object, bytes) of an upload its owner (or an admin) may use; None otherwise."""
    if not FILE_ID.fullmatch(file_id):
        return None
    meta = read_json_object(files_dir(settings) / f"{file_id}.json")
    if meta is None or (meta.get("user") != user and not admin):
        return None
    return meta, (files_dir(settings) / f"{file_id}.jsonl").read_bytes()


def list_files(settings: ApplianceSettings, user: str, admin: bool) -> list[dict]:
    out = []
    for path in files_dir(settings).glob("file-*.json"):
        meta = read_json_object(path)
        if meta and (admin or meta.get("user") == user):
            out.append(meta)
    return sorted(out, key=lambda m: m["created_at"], reverse=True)


def delete_file(settings: ApplianceSettings, file_id: str) -> None:
    for suffix in (".jsonl", ".json"):
        (files_dir(settings) / f"{file_id}{suffix}").unlink(missing_ok=True)
