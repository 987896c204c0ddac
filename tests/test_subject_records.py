"""The subject service's durable parts without Ray: the state machine, the store, erasure over S3,
and the scheduler's recovery, retention and idempotency (tests/test_subject_service.py runs it all
over HTTP with Ray)."""

import asyncio
import time

import pytest

from api_fakes import InProcessScheduler
from dreamblend_ray.io import storage
from dreamblend_ray.jobs.common import write_parquet
from dreamblend_ray.jobs.finetune import RESULT_SCHEMA
from dreamblend_ray.lifecycle import async_jobs, records
from dreamblend_ray.lifecycle.erasure import erase_subject
from dreamblend_ray.lifecycle.scheduler import IdempotencyMismatch, SubjectExists
from dreamblend_ray.training import layout


def record(subject_id="dog", **changes):
    return {**records.new_record(subject_id, "dog", "sks", {"steps": 4}, "tiny", ["0000.png"]), **changes}


def test_the_state_machine_allows_only_its_moves():
    queued = record()
    training = records.transition(queued, "training")
    assert training["attempts"] == 1 and training["started_at"] and training["finished_at"] is None
    ready = records.transition(training, "ready")
    assert ready["finished_at"] and queued["status"] == "queued"  # pure: the input is unchanged
    for start, bad in (("ready", "training"), ("failed", "queued"), ("canceled", "ready"), ("queued", "ready")):
        with pytest.raises(ValueError, match=f"from {start} to {bad}"):
            records.transition({**queued, "status": start}, bad)
    requeued = records.transition(training, "queued")
    assert records.transition(requeued, "training")["attempts"] == 2


def test_retention_counts_from_the_end_of_the_run():
    done = records.transition(records.transition(record(), "training"), "ready", now=time.time() - 8 * 86400)
    assert records.expired(done, default_days=7) and not records.expired(done, default_days=None)
    assert records.expired({**done, "retention_days": 10}, default_days=7) is False
    assert not records.expired(record(), default_days=1)  # never a subject that has not finished


def test_status_of_reads_records_and_the_jobs_subjects(tmp_path):
    root = str(tmp_path)
    assert records.status_of(root, "dog") == ("missing", None)
    storage.write_json(layout.manifest_uri(root, "made-by-a-job"), {})
    assert records.status_of(root, "made-by-a-job")[0] == "ready"  # subject.json alone: ready
    records.write_state(root, record())
    assert records.status_of(root, "dog")[0] == "queued"
    records.write_state(root, record(deleting=True))
    assert records.status_of(root, "dog")[0] == "missing"  # being deleted is gone to every reader


def test_erasure_over_s3_removes_everything_of_the_subject_and_nothing_else(s3_bucket):
    root = f"{s3_bucket}/store"
    for subject_id in ("dog", "cat"):
        for name in ("images/0000.png", "checkpoints/step-2/pytorch_lora_weights.safetensors", "subject.json",
                     "state.json", "progress.json", "collapse.png"):
            storage.write_bytes(storage.join(root, "subjects", subject_id, name), b"x")
    storage.write_bytes(storage.join(root, "class_images", "abc", "dog", "0000.png"), b"class")
    run = storage.join(root, "runs", "run-1")
    rows = [{"subject_id": s, "status": "succeeded"} for s in ("dog", "cat")]
    write_parquet(storage.join(run, "results.parquet"), rows, RESULT_SCHEMA)
    write_parquet(storage.join(run, "rows", "dog.parquet"), rows[:1], RESULT_SCHEMA)
    job = async_jobs.new_job("job-0123456789abcdef", [{"row": 0, "subject_id": "dog", "prompt": "p", "seed": 0,
                                                      "num_images": 1}], None, None)
    job["results"] = [{"n": 0, "subject_id": "dog", "prompt": "p", "seed": 0, "status": "succeeded",
                       "error": None, "image_uri": "x"}]
    async_jobs.write_job(root, job)
    storage.write_bytes(storage.join(async_jobs.job_uri(root, job["id"]), "images", "dog", "0-0.png"), b"png")

    removed = erase_subject(root, "dog")
    assert removed == {"files": 6, "result_rows": 2, "job_images": 1}
    assert storage.list_files(storage.join(root, "subjects", "dog")) == []
    assert len(storage.list_files(storage.join(root, "subjects", "cat"))) == 6
    assert storage.exists(storage.join(root, "class_images", "abc", "dog", "0000.png"))  # no personal data
    from dreamblend_ray.jobs.common import read_parquet

    assert [r["subject_id"] for r in read_parquet(storage.join(run, "results.parquet"))] == ["cat"]
    assert not storage.exists(storage.join(run, "rows", "dog.parquet"))
    assert async_jobs.read_job(root, job["id"])["results"][0]["error"] == "subject deleted"
    assert erase_subject(root, "dog") == {"files": 0, "result_rows": 0, "job_images": 0}  # twice: harmless


def test_the_scheduler_rebuilds_its_queue_from_storage(tmp_path):
    root = str(tmp_path)
    interrupted = records.transition(record("first"), "training")
    records.write_state(root, interrupted)
    records.write_state(root, record("second", seq=interrupted["seq"] + 1))
    worn_out = record("worn", status="training", attempts=3)
    records.write_state(root, worn_out)
    records.write_state(root, record("half-uploaded", uploading=True))
    scheduler = InProcessScheduler({"storage_root": root, "training_max_retries": 2})
    assert scheduler.queue == [("default", "first"), ("default", "second")]  # the interrupted first; uploads never ran
    assert records.read_state(root, "first")["status"] == "queued"
    failed = records.read_state(root, "worn")
    assert failed["status"] == "failed" and "interrupted 3 times" in failed["error"]


def test_reserve_commit_idempotency_and_taken_ids(tmp_path):
    root = str(tmp_path)
    scheduler = InProcessScheduler({"storage_root": root, "max_concurrent_trainings": 1})

    async def scenario():
        view = await scheduler.reserve(record("a"), ("key-1", "body-1"))
        assert view["replayed"] is False and records.read_state(root, "a")["uploading"]
        await scheduler.commit("default", "a", ["0000.png"])
        again = await scheduler.reserve(record("b"), ("key-1", "body-1"))
        assert again["replayed"] is True and again["id"] == "a"
        with pytest.raises(IdempotencyMismatch):
            await scheduler.reserve(record("c"), ("key-1", "body-2"))
        with pytest.raises(SubjectExists):
            await scheduler.reserve(record("a"))
        await scheduler.reserve(record("d"))
        await scheduler.commit("default", "d", ["0000.png"])
        assert await scheduler.positions() == {"d": 1}  # a trains (one at a time), d waits
        canceled = await scheduler.cancel("default", "d")
        assert canceled["status"] == "canceled" and await scheduler.positions() == {}

    asyncio.run(scenario())
    assert not storage.exists(storage.join(root, "idempotency", "key-1.json"))  # stored by hash only


def test_the_retention_sweep_deletes_expired_subjects(tmp_path):
    root = str(tmp_path)
    old = records.transition(records.transition(record("old", retention_days=1), "training"), "ready",
                             now=time.time() - 2 * 86400)
    records.write_state(root, old)
    records.write_state(root, records.transition(records.transition(record("new"), "training"), "ready"))
    scheduler = InProcessScheduler({"storage_root": root, "retention_days": 30})
    assert asyncio.run(scheduler.sweep_retention()) == [("default", "old")]
    assert storage.list_files(storage.join(root, "subjects", "old")) == []
    assert records.status_of(root, "new")[0] == "ready"
