"""Fine-tuning through the gateway, shaped like OpenAI's API: upload a dataset to `/v1/files`
(purpose "fine-tune"), create a job from it at `/v1/fine_tuning/jobs`, follow and cancel it.
Users see their own files and jobs; administrators see all."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from appliance.errors import ApplianceError
from appliance.gateway.audit_events import audit
from appliance.gateway.auth import authenticated
from appliance.gateway.json_body import json_object
from appliance.gateway.protocol import RequestError
from appliance.security.api_keys import Principal
from appliance.training import files, service
from appliance.training.dataset import DatasetError
from appliance.training.jobs import TrainingJob, load_job

router = APIRouter(prefix="/v1", dependencies=[Depends(authenticated)])
Who = Annotated[Principal, Depends(authenticated)]


def _gw(request: Request):
    gw = request.app.state.gateway
    if gw.settings.breaker.enabled:
        message = (
            "fine-tuning needs direct access to Slurm; this gateway reaches the cluster "
            "through the breaker only"
        )
        raise RequestError(501, message, code="not_available")
    return gw


def _dataset_error(exc: DatasetError) -> RequestError:
    return RequestError(
        400, str(exc), param="training_file", code="invalid_dataset", details=exc.problems
    )


@router.post("/files")
async def upload_file(request: Request, who: Who) -> dict:
    gw = _gw(request)
    limit = gw.settings.training.max_dataset_bytes
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise RequestError(411, "uploads need a Content-Length header")
    if int(declared) > limit + 64 * 1024:  # the multipart framing on top of the file
        raise RequestError(
            413, f"the dataset is larger than {limit} bytes (training.max_dataset_bytes)"
        )
    form = await request.form(max_files=1)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "no file: send it as multipart field 'file'", param="file")
        if form.get("purpose", "fine-tune") != "fine-tune":
            raise RequestError(400, "only purpose 'fine-tune' is supported", param="purpose")
        data, filename = await upload.read(), upload.filename or "dataset.jsonl"
    finally:
        await form.close()
    if len(data) > limit:
        raise RequestError(413, f"the dataset is larger than {limit} bytes")
    try:
        meta = await asyncio.to_thread(files.save_dataset, gw.settings, who.user, filename, data)
    except DatasetError as exc:
        raise _dataset_error(exc) from None
    await audit(
        request,
        who.user,
        "upload",
        meta["id"],
        filename=meta["filename"],
        purpose="fine-tune",
        bytes=len(data),
    )
    return meta


@router.get("/files")
async def list_uploaded(request: Request, who: Who) -> dict:
    return {"object": "list", "data": files.list_files(_gw(request).settings, who.user, who.admin)}


@router.delete("/files/{file_id}")
async def delete_uploaded(file_id: str, request: Request, who: Who) -> dict:
    gw = _gw(request)
    if files.dataset_file(gw.settings, file_id, who.user, who.admin) is None:
        raise RequestError(404, f"no file {file_id}")
    files.delete_file(gw.settings, file_id)
    await audit(request, who.user, "document_delete", file_id, purpose="fine-tune")
    return {"id": file_id, "object": "file", "deleted": True}


def _job(request: Request, who: Principal, job_id: str) -> TrainingJob:
    job = load_job(_gw(request).settings, job_id)
    if job is None or (job.user != who.user and not who.admin):
        raise RequestError(404, f"no fine-tuning job {job_id}")
    return job


async def _view(request: Request, job: TrainingJob) -> dict:
    gw = _gw(request)
    slurm_jobs = await asyncio.to_thread(service.training_slurm_jobs, gw.settings, gw.slurm)
    return service.job_view(gw.settings, job, slurm_jobs.get(job.slurm_job_id))


@router.post("/fine_tuning/jobs")
async def create_job(request: Request, who: Who) -> dict:
    gw = _gw(request)
    body = await json_object(request)
    model, file_id = body.get("model"), body.get("training_file")
    if not isinstance(model, str) or not isinstance(file_id, str):
        raise RequestError(400, "'model' and 'training_file' are required")
    found = files.dataset_file(gw.settings, file_id, who.user, who.admin)
    if found is None:
        raise RequestError(404, f"no file {file_id}", param="training_file")
    meta, data = found
    hp = body.get("hyperparameters") or {}
    if not isinstance(hp, dict):
        raise RequestError(400, "'hyperparameters' must be an object", param="hyperparameters")
    # OpenAI's name for epochs.
    if "n_epochs" in hp:
        hp = {**{k: v for k, v in hp.items() if k != "n_epochs"}, "epochs": hp["n_epochs"]}
    try:
        job = await asyncio.to_thread(
            lambda: service.create_job(
                gw.settings,
                gw.catalog,
                gw.slurm,
                user=who.user,
                model=model,
                data=data,
                dataset_name=meta["filename"],
                overrides=hp,
                suffix=body.get("suffix"),
            )
        )
    except DatasetError as exc:
        raise _dataset_error(exc) from None
    except ValueError as exc:  # hyperparameters out of range (pydantic)
        raise RequestError(400, f"hyperparameters: {exc}", param="hyperparameters") from None
    except ApplianceError as exc:
        raise RequestError(400, str(exc), code="cannot_fine_tune") from None
    await audit(
        request,
        who.user,
        "training_start",
        model,
        job_id=job.id,
        slurm_job_id=job.slurm_job_id,
        output_model=job.output_model,
    )
    return await _view(request, job)


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request, who: Who) -> dict:
    gw = _gw(request)
    slurm_jobs = await asyncio.to_thread(service.training_slurm_jobs, gw.settings, gw.slurm)
    jobs = service.visible_jobs(gw.settings, who.user, who.admin)
    data = [service.job_view(gw.settings, j, slurm_jobs.get(j.slurm_job_id)) for j in jobs]
    return {"object": "list", "data": data}


@router.get("/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, request: Request, who: Who) -> dict:
    view = await _view(request, _job(request, who, job_id))
    if view["status"] == "succeeded":
        request.app.state.gateway.catalog.refresh()  # serve the new model without delay
    return view


@router.get("/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, who: Who) -> dict:
    """The job's log, newest last (what the trainer and its supervisor printed)."""
    job = _job(request, who, job_id)
    text = service.log_tail(_gw(request).settings, job, 200)
    return {
        "object": "list",
        "data": [
            {"object": "fine_tuning.job.event", "message": line} for line in text.splitlines()
        ],
    }


@router.get("/fine_tuning/jobs/{job_id}/metrics")
async def job_metrics(job_id: str, request: Request, who: Who) -> dict:
    """Loss and learning rate at each step, for plots."""
    job = _job(request, who, job_id)
    return {"object": "list", "data": service.step_metrics(_gw(request).settings, job)}


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, who: Who) -> dict:
    gw = _gw(request)
    job = _job(request, who, job_id)
    try:
        await asyncio.to_thread(service.cancel_job, gw.settings, gw.slurm, job)
    except ApplianceError as exc:
        raise RequestError(409, str(exc), code="cannot_cancel") from None
    await audit(request, who.user, "training_cancel", job.model, job_id=job.id)
    return await _view(request, job)
