"""Asynchronous generation jobs: a list of requests, run by the bulk generate job, results stored.

Layout under the service's storage root::

    jobs/{id}/job.json                 the record (written by the scheduler only)
    jobs/{id}/images/{subject}/{row}-{k}.png   the images (the bulk job's layout)
    jobs/{id}/runs/{id}/index.parquet  the bulk job's index

States: ``queued -> running -> succeeded | failed``. A job whose scheduler died while it ran is run
again from the start (images are deterministic given their seeds, so a rerun rewrites the same
files). Image ``n`` of a job is its n-th requested image, in request order.
"""

from __future__ import annotations

import secrets
import time

from dreamblend_ray.config import DEFAULT_TENANT
from dreamblend_ray.io import storage
from dreamblend_ray.jobs.common import JobResources
from dreamblend_ray.jobs.manifests import GenerationRequest
from dreamblend_ray.lifecycle.records import now_iso

JOB_NAME = "job.json"
JOB_STATUSES = ("queued", "running", "succeeded", "failed")
JOB_FINAL = ("succeeded", "failed")


def new_job_id() -> str:
    return "job-" + secrets.token_hex(8)


def job_uri(root: str, job_id: str) -> str:
    return storage.join(root, "jobs", job_id)


def record_uri(root: str, job_id: str) -> str:
    return storage.join(job_uri(root, job_id), JOB_NAME)


def new_job(job_id: str, requests: list[dict], webhook_url: str | None, request_id: str | None,
            now: float | None = None, tenant: str = DEFAULT_TENANT) -> dict:
    """A queued job; ``requests`` are the bulk job's rows (``jobs.manifests.GenerationRequest`` fields)."""
    now = time.time() if now is None else now
    return {"id": job_id, "tenant": tenant, "status": "queued", "requests": requests, "webhook_url": webhook_url,
            "request_id": request_id, "images_total": sum(r["num_images"] for r in requests),
            "seq": int(now * 1e9), "created_at": now_iso(now), "started_at": None, "finished_at": None,
            "results": None, "error": None}


def read_job(root: str, job_id: str) -> dict | None:
    try:
        return storage.read_json(record_uri(root, job_id))
    except FileNotFoundError:
        return None


def write_job(root: str, record: dict) -> None:
    storage.write_json(record_uri(root, record["id"]), record)


def images_done(root: str, job_id: str) -> int:
    """Images written so far (the progress of a running job)."""
    return sum(name.endswith(".png") for name in storage.list_files(storage.join(job_uri(root, job_id), "images")))


def list_jobs(root: str) -> list[dict]:
    out = []
    for name in storage.list_dir(storage.join(root, "jobs")):
        record = read_job(root, name)
        if record is not None:
            out.append(record)
    return out


def results_of(index: list[dict], requests: list[dict]) -> list[dict]:
    """One entry per requested image, in request order: n, the bulk job's row and k, status."""
    by_key = {(r["row"], r["k"]): r for r in index}
    out = []
    for request in requests:
        for k in range(request["num_images"]):
            row = by_key.get((request["row"], k), {})
            out.append({"n": len(out), "subject_id": request["subject_id"], "prompt": request["prompt"],
                        "seed": request["seed"] + k, "status": row.get("status", "failed"),
                        "error": row.get("error") if row else "never made", "image_uri": row.get("image_uri")})
    return out


def run_job(root: str, job_id: str, base: str, num_cpus: float, num_gpus: float) -> list[dict]:
    """The bulk generate job on the job's requests (a Ray task's body); its results, in order."""
    from dreamblend_ray.jobs.generate import run_generate_job  # loads torch: only in the job's task

    record = read_job(root, job_id)
    if record is None:
        raise RuntimeError(f"job {job_id} is gone")
    requests = [GenerationRequest(**r) for r in record["requests"]]
    resources = JobResources(num_actors=1, cpus_per_actor=num_cpus, gpus_per_actor=num_gpus, torch_threads=1)
    result = run_generate_job(requests, job_uri(root, job_id), checkpoints_root=root, base=base,
                              resources=resources, run_id=job_id)
    return results_of(result.rows, record["requests"])
