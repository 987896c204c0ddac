"""Erasure of a subject: everything stored for it, nothing else (GDPR art. 17).

Removed: the whole ``subjects/{id}/`` prefix (instance images, checkpoints, subject.json, state and
progress, the attention probe's plot), the subject's result rows in every job run
(``runs/{run}/rows/{id}.parquet``, and its rows of ``runs/{run}/results.parquet``, rewritten
without them), and the images asynchronous jobs made of it (``jobs/{job}/images/{id}/``; the job's
results then list them as failed, "subject deleted"). Kept: the shared class-image cache (images the base model generated for a class
noun: no personal data) and other subjects' files. Idempotent: erasing twice is harmless.
"""

from __future__ import annotations

import logging

from dreamblend_ray.config import validate_subject_id
from dreamblend_ray.io import storage
from dreamblend_ray.jobs import run_records
from dreamblend_ray.jobs.common import read_parquet, write_parquet
from dreamblend_ray.jobs.finetune import RESULT_SCHEMA
from dreamblend_ray.lifecycle import async_jobs
from dreamblend_ray.training import layout

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.parquet"


def erase_subject(root: str, subject_id: str) -> dict:
    """Delete everything stored for ``subject_id`` under ``root``; returns what was removed (counts)."""
    subject_id = validate_subject_id(subject_id)
    prefix = layout.subject_uri(root, subject_id)
    files = len(storage.list_files(prefix))
    storage.delete(prefix)
    rows = sum(_erase_from_run(storage.join(root, "runs", run), subject_id)
               for run in storage.list_dir(storage.join(root, "runs")))
    images = sum(_erase_from_job(root, job_id, subject_id) for job_id in storage.list_dir(storage.join(root, "jobs")))
    logger.info("erased subject %s: %d files, %d result rows, %d job images", subject_id, files, rows, images)
    return {"files": files, "result_rows": rows, "job_images": images}


def _erase_from_job(root: str, job_id: str, subject_id: str) -> int:
    """Drop the images an async job made of the subject; its results name them as deleted."""
    folder = storage.join(async_jobs.job_uri(root, job_id), "images", subject_id)
    count = len(storage.list_files(folder))
    storage.delete(folder)
    record = async_jobs.read_job(root, job_id)
    if record and any(r["subject_id"] == subject_id for r in record.get("results") or []):
        record["results"] = [{**r, "status": "failed", "error": "subject deleted", "image_uri": None}
                             if r["subject_id"] == subject_id else r for r in record["results"]]
        async_jobs.write_job(root, record)
    return count


def _erase_from_run(run: str, subject_id: str) -> int:
    """Drop the subject's row file and its rows of the run's results table; the rows removed."""
    removed = 0
    row = run_records.row_uri(run, subject_id)
    if storage.exists(row):
        storage.delete(row)
        removed += 1
    results = storage.join(run, RESULTS_NAME)
    if storage.exists(results):
        rows = read_parquet(results)
        kept = [r for r in rows if r.get("subject_id") != subject_id]
        if len(kept) != len(rows):
            write_parquet(results, kept, RESULT_SCHEMA)
            removed += len(rows) - len(kept)
    return removed
