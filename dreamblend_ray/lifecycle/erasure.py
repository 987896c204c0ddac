"""Erasure of a subject: everything stored for it, nothing else (GDPR art. 17).

Removed: the whole ``subjects/{id}/`` prefix (instance images, checkpoints, subject.json, state and
progress, the attention probe's plot) and the subject's result rows in every job run
(``runs/{run}/rows/{id}.parquet``, and its rows of ``runs/{run}/results.parquet``, rewritten
without them). Kept: the shared class-image cache (images the base model generated for a class
noun: no personal data) and other subjects' files. Idempotent: erasing twice is harmless.
"""

from __future__ import annotations

import logging

from dreamblend_ray.config import validate_subject_id
from dreamblend_ray.io import storage
from dreamblend_ray.jobs import run_records
from dreamblend_ray.jobs.common import read_parquet, write_parquet
from dreamblend_ray.jobs.finetune import RESULT_SCHEMA
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
    logger.info("erased subject %s: %d files and %d result rows", subject_id, files, rows)
    return {"files": files, "result_rows": rows}


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
