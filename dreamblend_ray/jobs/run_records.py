"""Durable per-subject results of a job run: one small Parquet file per finished subject.

Layout under a run (``{output}/runs/{run_id}/``)::

    job.json                      what was asked, with every subject id (written first)
    rows/{subject_id}.parquet     one result row, written atomically as soon as that subject ends
    results.parquet               all rows, gathered from the above when the run ends

A row is written by whoever finished the subject: the actor that fine-tuned it, or the driver for
a subject that was already complete. So when the driver dies (SIGKILL, a lost head node) or the
Ray Data execution fails, every subject that finished still has its row, and
``finetune_job.gather_results`` (``jobs/finetune_subjects.py --gather --run-id ID``) turns them
into the results table, with a failed row for each subject that never finished.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from dreamblend_ray.io import storage
from dreamblend_ray.config import validate_subject_id
from dreamblend_ray.jobs.common import error_text, read_parquet, write_parquet

logger = logging.getLogger(__name__)

ROWS_FOLDER = "rows"


def row_uri(run: str, subject_id: str) -> str:
    return storage.join(run, ROWS_FOLDER, f"{validate_subject_id(subject_id)}.parquet")


def save_row(run: str, row: dict, schema: pa.Schema) -> bool:
    """Write ``row`` to its file under ``run`` (atomic, retried). A failure is logged, not raised:
    the row still reaches the driver, which puts it in results.parquet."""
    try:
        write_parquet(row_uri(run, row["subject_id"]), [row], schema)
        return True
    except Exception as exc:  # noqa: BLE001 - the row travels on to the driver either way
        logger.warning("subject %s: its result row could not be saved under %s: %s", row["subject_id"], run,
                       error_text(exc))
        return False


def save_missing(run: str, rows: list[dict], schema: pa.Schema) -> int:
    """Save those of ``rows`` whose file is absent (the actor's save failed: a storage outage longer
    than its retries), so that the run's rows stay complete; returns how many were saved."""
    def ensure(row: dict) -> bool:
        return not storage.exists(row_uri(run, row["subject_id"])) and save_row(run, row, schema)

    if not rows:
        return 0
    with ThreadPoolExecutor(max_workers=min(16, len(rows))) as pool:
        return sum(pool.map(ensure, rows))


def read_rows(run: str, subject_ids: list[str] | None = None) -> dict[str, dict]:
    """The saved rows of ``run`` by subject id (all of them, or only those of ``subject_ids``)."""
    folder = storage.join(run, ROWS_FOLDER)
    names = [n for n in storage.list_dir(folder) if n.endswith(".parquet") and not n.startswith(".")]
    if subject_ids is not None:
        wanted = {f"{s}.parquet" for s in subject_ids}
        names = [n for n in names if n in wanted]
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        tables = pool.map(lambda name: read_parquet(storage.join(folder, name)), names)
        return {row["subject_id"]: row for rows in tables for row in rows}
