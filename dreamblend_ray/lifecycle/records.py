"""A service-created subject's durable record: its state machine and where it lives in storage.

Under the service's storage root, beside the files every subject has (``training.layout``)::

    subjects/{id}/state.json       the lifecycle record, written only by the scheduler (atomic)
    subjects/{id}/progress.json    the training's progress, written only by the training worker
    subjects/{id}/images/NNNN.png  the validated instance images (re-encoded, EXIF stripped)
    idempotency/{sha256(key)}.json an Idempotency-Key's subject and body digest

States::

    queued ──> training ──> ready
      │           ├──────> failed      (the reason in ``error``)
      │           ├──────> canceled
      │           └──────> queued      (its worker or the scheduler died: resumed from the last checkpoint)
      └──────────────────> canceled

A subject made by ``dreamblend finetune`` or the bulk job has no state.json: its subject.json makes
it ``ready``. Deletion is not a state: ``deleting`` marks the record while its files are removed.
The transitions are a pure function (``transition``); the store functions do one storage call each.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from dreamblend_ray.config import DEFAULT_TENANT, SUBJECT_ID_PATTERN, TENANT_PATTERN
from dreamblend_ray.io import storage
from dreamblend_ray.training import layout

RECORD_VERSION = 1
STATE_NAME = "state.json"
PROGRESS_NAME = "progress.json"
IMAGES_FOLDER = "images"
IDEMPOTENCY_FOLDER = "idempotency"

STATUSES = ("queued", "training", "ready", "failed", "canceled")
FINAL = ("ready", "failed", "canceled")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("training", "canceled", "failed"),
    "training": ("ready", "failed", "canceled", "queued"),
    "ready": (), "failed": (), "canceled": (),
}


def now_iso(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))


# --------------------------------------------------------------------------- the state machine (pure)

def new_record(subject_id: str, class_noun: str, token: str, finetune: dict, base: str, images: list[str],
               webhook_url: str | None = None, retention_days: int | None = None, request_id: str | None = None,
               now: float | None = None, tenant: str = DEFAULT_TENANT, max_concurrent: int | None = None) -> dict:
    """A queued subject's record; ``seq`` (nanoseconds at creation) orders the queue;
    ``max_concurrent``: its tenant's concurrent-trainings quota when it was created."""
    now = time.time() if now is None else now
    return {"version": RECORD_VERSION, "id": subject_id, "tenant": tenant, "max_concurrent": max_concurrent,
            "status": "queued", "class_noun": class_noun,
            "token": token, "finetune": finetune, "base": base, "images": list(images),
            "webhook_url": webhook_url, "retention_days": retention_days, "request_id": request_id,
            "seq": int(now * 1e9), "created_at": now_iso(now), "updated_at": now_iso(now), "started_at": None,
            "finished_at": None, "attempts": 0, "error": None, "cancel_requested": False, "deleting": False}


def owner(record: dict) -> tuple[str, str]:
    """(tenant, id) of a subject or job record (records written before tenants are ``default``'s)."""
    return record.get("tenant") or DEFAULT_TENANT, record["id"]


def transition(record: dict, status: str, now: float | None = None, **changes: Any) -> dict:
    """A copy of ``record`` moved to ``status`` (ValueError for a move the machine does not allow)."""
    if status not in TRANSITIONS.get(record["status"], ()):
        raise ValueError(f"subject {record['id']!r} cannot go from {record['status']} to {status}")
    stamp = now_iso(now)
    out = {**record, **changes, "status": status, "updated_at": stamp}
    if status == "training":
        out["started_at"] = stamp
        out["attempts"] = record["attempts"] + 1
    if status in FINAL:
        out["finished_at"] = stamp
    return out


def expired(record: dict, default_days: int | None, now: float | None = None) -> bool:
    """Whether a finished record is past its retention (its own ``retention_days`` or the default)."""
    days = record.get("retention_days") or default_days
    if not days or record["status"] not in FINAL or not record.get("finished_at"):
        return False
    finished = time.mktime(time.strptime(record["finished_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    return (time.time() if now is None else now) - finished > days * 86400


# --------------------------------------------------------------------------- where things are

def state_uri(root: str, subject_id: str) -> str:
    return storage.join(layout.subject_uri(root, subject_id), STATE_NAME)


def progress_uri(root: str, subject_id: str) -> str:
    return storage.join(layout.subject_uri(root, subject_id), PROGRESS_NAME)


def images_uri(root: str, subject_id: str) -> str:
    return storage.join(layout.subject_uri(root, subject_id), IMAGES_FOLDER)


def image_name(index: int) -> str:
    return f"{index:04d}.png"


def idempotency_uri(root: str, key: str) -> str:
    """The record of an Idempotency-Key, by its SHA-256 (the key itself is never stored)."""
    return storage.join(root, IDEMPOTENCY_FOLDER, hashlib.sha256(key.encode()).hexdigest() + ".json")


# --------------------------------------------------------------------------- storage

def read_state(root: str, subject_id: str) -> dict | None:
    """The lifecycle record, or None for a subject the service did not create (or none at all)."""
    try:
        return storage.read_json(state_uri(root, subject_id))
    except FileNotFoundError:
        return None


def write_state(root: str, record: dict) -> None:
    storage.write_json(state_uri(root, record["id"]), record)


def read_progress(root: str, subject_id: str) -> dict | None:
    try:
        return storage.read_json(progress_uri(root, subject_id))
    except (FileNotFoundError, ValueError):
        return None


def write_progress(root: str, subject_id: str, progress: dict) -> None:
    storage.write_json(progress_uri(root, subject_id), progress)


def status_of(root: str, subject_id: str) -> tuple[str, dict | None]:
    """(status, record): the record's status, ``ready`` for a subject made by the jobs, or
    ``missing``; a record being deleted is ``missing`` to every reader."""
    record = read_state(root, subject_id)
    if record is not None:
        return ("missing" if record.get("deleting") else record["status"]), record
    return ("ready" if layout.is_complete(root, subject_id) else "missing"), None


def list_ids(root: str) -> list[str]:
    """Every subject folder's id (records, complete subjects, and leftovers), sorted."""
    names = storage.list_dir(storage.join(root, "subjects"))
    return sorted(n for n in names if SUBJECT_ID_PATTERN.fullmatch(n))


def tenants(root: str) -> list[str]:
    """The tenants with anything under ``root``: ``default`` (the root itself) and every
    ``tenants/{tenant}/`` folder."""
    found = [n for n in storage.list_dir(storage.join(root, "tenants")) if TENANT_PATTERN.fullmatch(n)]
    return [DEFAULT_TENANT, *sorted(n for n in found if n != DEFAULT_TENANT)]


def list_records(root: str) -> list[dict]:
    """Every lifecycle record under ``root`` (subjects the service created)."""
    records = []
    for subject_id in list_ids(root):
        record = read_state(root, subject_id)
        if record is not None:
            records.append(record)
    return records
