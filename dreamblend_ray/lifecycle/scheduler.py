"""The subject service's scheduler: one small Ray actor per storage root that owns every transition.

    ingress ── submit / cancel / delete / submit_job ──> SubjectScheduler (this actor, no CPUs)
                                                           │ admits up to max_concurrent_trainings,
                                                           │ in arrival order (``seq``)
                                                           ├─> run_training  (Ray task, training resources)
                                                           ├─> run_job       (Ray task: the bulk generate job)
                                                           ├─> webhook outbox (delivered every tick)
                                                           └─> retention sweep
    model replicas ── poll_deletions ──> (deleted ids; their acks let a DELETE answer)

Only this actor writes ``state.json`` and ``job.json``; training workers write ``progress.json``.
All of it lives in storage, so the actor itself is disposable: it is detached and restarted by Ray
(``max_restarts=-1``) and rebuilds its queue from storage when it starts. A subject found
``training`` then is queued again (its worker died with the old actor) and resumes from its last
checkpoint; after ``training_max_retries`` such restarts it fails with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict

from dreamblend_ray.observability import metrics
from dreamblend_ray.config import DEFAULT_TENANT
from dreamblend_ray.io import storage
from dreamblend_ray.io.netguard import NetPolicy
from dreamblend_ray.jobs.common import error_text
from dreamblend_ray.lifecycle import async_jobs, records, webhooks
from dreamblend_ray.lifecycle.training import run_training
from dreamblend_ray.training import layout
from dreamblend_ray.lifecycle.settings import ServiceSettings

logger = logging.getLogger(__name__)

NAMESPACE = "dreamblend"
ACK_TIMEOUT_S = 10.0  # how long a DELETE waits for the model replicas to drop the subject
REPLICA_STALE_S = 5.0  # a replica that has not polled for this long is gone
STOP_TIMEOUT_S = 30.0  # how long a cancel or delete waits for a running training to stop


class SubjectExists(ValueError):
    """A create named an id that is taken."""


class IdempotencyMismatch(ValueError):
    """An Idempotency-Key reused with another body."""


class QuotaExceeded(ValueError):
    """A tenant's quota refuses the request (429); ``quota`` names it."""

    def __init__(self, quota: str, message: str, retry_after_s: int = 60):
        super().__init__(message)
        self.quota, self.retry_after_s = quota, retry_after_s


def _error_text(exc: BaseException) -> str:
    return error_text(exc, 500)


Owner = tuple  # (tenant, subject or job id): every queue, map and deletion is keyed on it


class SubjectScheduler:
    """The actor's body (a plain class, so tests can drive it without Ray's actor machinery).

    Tenants: every record lives under its tenant's root (``layout.tenant_root``); the queues hold
    (tenant, id) pairs, so two tenants' ``dog`` are two subjects. A tenant's concurrent-trainings
    quota is carried by its records (``max_concurrent``); admission skips a tenant at its quota
    without letting it hold up the others (arrival order otherwise)."""

    def __init__(self, settings: dict):
        self.settings = ServiceSettings.from_args(settings)
        self.root = self.settings.storage_root
        self.queue: list[Owner] = []  # queued subjects, arrival order
        self.running: dict[Owner, object] = {}  # -> ObjectRef of its training
        self.job_queue: list[Owner] = []
        self.jobs_running: dict[Owner, object] = {}
        self.epoch = time.time_ns()  # grows across restarts, so a replica's acknowledged epoch stays valid
        self.deletions: list[tuple[int, Owner]] = []  # what the replicas must drop
        self.replicas: dict[str, tuple[int, float]] = {}  # replica id -> (epoch processed, last poll)
        self.outbox = self._outbox()
        self.erasures: list[Owner] = []  # deletions a dead scheduler left half done
        self.last_sweep = 0.0
        self._loop: asyncio.Task | None = None
        self._delivery: asyncio.Task | None = None
        self._reserving = asyncio.Lock()
        self._recover()

    def root_of(self, tenant: str) -> str:
        return layout.tenant_root(self.root, tenant)

    # ------------------------------------------------------------------ start-up

    def _outbox(self) -> webhooks.Outbox | None:
        s = self.settings
        secret = webhooks.load_secret(s.webhook_secret_env, s.webhook_secret_file)
        net = NetPolicy(allow_hosts=s.webhook_allow_hosts, allow_private=s.webhook_allow_private,
                        allow_loopback=s.webhook_allow_loopback, require_https=not s.webhook_allow_loopback)
        policy = webhooks.WebhookPolicy(max_attempts=s.webhook_max_attempts, base_delay_s=s.webhook_base_delay_s,
                                        net=net)
        return webhooks.Outbox(self.root, secret, policy)

    def _recover(self) -> None:
        """Rebuild the queues from storage: queued and interrupted trainings, unfinished jobs,
        half-done deletions (finished by the first ticks), across every tenant."""
        found = [r for tenant in records.tenants(self.root) for r in records.list_records(self.root_of(tenant))]
        for record in sorted(found, key=lambda r: r["seq"]):
            owner = records.owner(record)
            if record.get("deleting"):
                self.erasures.append(owner)
            elif record["status"] == "training":
                if self._interrupted(record)["status"] == "queued":
                    self.queue.insert(0, owner)
            elif record["status"] == "queued" and not record.get("uploading"):
                self.queue.append(owner)
        jobs = [j for tenant in records.tenants(self.root) for j in async_jobs.list_jobs(self.root_of(tenant))]
        for job in sorted(jobs, key=lambda r: r["seq"]):
            if job["status"] in ("queued", "running"):
                self.job_queue.append(records.owner(job))
        logger.info("scheduler on %s: %d queued trainings, %d queued jobs, %d deletions to finish",
                    storage.scheme(self.root) or "local", len(self.queue), len(self.job_queue), len(self.erasures))

    def _interrupted(self, record: dict) -> dict:
        """A record found ``training`` at start-up: its worker is gone. Queue it to resume, or fail
        it when it has been restarted too often."""
        if record["attempts"] > self.settings.training_max_retries:
            return self._finish(record, "failed", error=f"training was interrupted {record['attempts']} times "
                                                        "(its worker or the scheduler died); giving up",
                                reason="worker_died")
        return self._entered(self._save(records.transition(record, "queued")))

    async def start(self) -> bool:
        """Start the periodic loops (idempotent); True once running. Webhooks have a loop of their
        own, so a slow or dead receiver never holds up admissions, cancels or deletes."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.get_running_loop().create_task(self._deliver_forever())
        return True

    async def _deliver_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._deliver)
            except Exception:  # noqa: BLE001 - the loop must survive any one bad pass
                logger.exception("webhook delivery pass failed")
            await asyncio.sleep(self.settings.tick_s)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive any one bad tick
                logger.exception("scheduler tick failed")
            await asyncio.sleep(self.settings.tick_s)

    # ------------------------------------------------------------------ the tick

    async def tick(self) -> None:
        while self.erasures:
            await self.delete(*self.erasures.pop(0))
        await self._reap_trainings()
        await self._reap_jobs()
        self._admit()
        self._admit_jobs()
        self._report_active()
        if time.time() - self.last_sweep >= self.settings.retention_sweep_s:
            self.last_sweep = time.time()
            await self.sweep_retention()

    def _admit(self) -> None:
        """Start queued trainings in arrival order, up to the service's limit; a tenant at its own
        concurrent-trainings quota waits without holding up the others."""
        for owner in list(self.queue):
            if len(self.running) >= self.settings.max_concurrent_trainings:
                return
            record = records.read_state(self.root_of(owner[0]), owner[1])
            if record is None or record.get("deleting") or record["status"] != "queued":
                self.queue.remove(owner)
                continue
            limit = record.get("max_concurrent")
            if limit is not None and sum(t == owner[0] for t, _ in self.running) >= limit:
                continue
            self.queue.remove(owner)
            record = self._entered(self._save(records.transition(record, "training")))
            self._event(record, "subject.training")
            self.running[owner] = self._launch_training(owner)
            logger.info("subject %s of %s: training started (attempt %d)", owner[1], owner[0], record["attempts"])

    def _launch_training(self, owner: Owner):
        import ray

        s = self.settings
        task = ray.remote(run_training).options(
            num_cpus=s.training_num_cpus, num_gpus=s.training_num_gpus, resources=dict(s.training_resources),
            max_retries=s.training_max_retries, retry_exceptions=False, name=f"train:{owner[0]}/{owner[1]}")
        return task.remote(self.root_of(owner[0]), owner[1], s.base, s.training_torch_threads)

    async def _reap_trainings(self) -> None:
        import ray

        for owner, ref in list(self.running.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            del self.running[owner]
            try:
                await ref
                outcome, error, reason = "ready", None, None
            except Exception as exc:  # noqa: BLE001 - sorted into the record below
                outcome, error = self._failure(owner, exc)
                reason = metrics.failure_reason(getattr(exc, "cause", None) or exc)
            record = records.read_state(self.root_of(owner[0]), owner[1])
            if record is None or record.get("deleting") or record["status"] != "training":
                continue
            self._finish(record, outcome, error=error, reason=reason)

    def _failure(self, owner: Owner, exc: BaseException) -> tuple[str, str | None]:
        from ray.exceptions import TaskCancelledError, WorkerCrashedError

        record = records.read_state(self.root_of(owner[0]), owner[1]) or {}
        if isinstance(exc, TaskCancelledError) or record.get("cancel_requested") or \
                "TrainingStopped" in type(exc).__name__ + str(exc)[:200]:
            return "canceled", None
        if isinstance(exc, WorkerCrashedError) or "died" in str(exc)[:300].lower():
            tries = self.settings.training_max_retries + 1
            return "failed", f"the training worker died {tries} times (last: {type(exc).__name__})"
        cause = getattr(exc, "cause", None) or exc
        logger.error("subject %s of %s: training failed: %s", owner[1], owner[0], _error_text(exc))
        return "failed", f"training failed: {_error_text(cause)}"

    def _finish(self, record: dict, status: str, error: str | None = None, reason: str | None = None) -> dict:
        record = self._entered(self._save(records.transition(record, status, error=error)))
        if status == "failed":
            metrics.get("training_failures").inc(kind="service", reason=reason or "error")
        self._event(record, f"subject.{status}")
        logger.info("subject %s: %s%s", record["id"], status, f" ({error})" if error else "")
        return record

    # ------------------------------------------------------------------ the client's calls

    async def reserve(self, record: dict, idempotency: tuple[str, str] | None = None,
                      max_subjects: int | None = None) -> dict:
        """Claim a new subject's id before its images are stored (the record says ``uploading``).
        With (key, body digest), a retried create gets the first subject's view back instead
        (``replayed``). SubjectExists / IdempotencyMismatch / QuotaExceeded for the client's mistakes."""
        await self.start()
        async with self._reserving:  # count-then-save is one step: two creates cannot both take the last slot
            return await self._reserve(record, idempotency, max_subjects)

    async def _reserve(self, record: dict, idempotency: tuple[str, str] | None, max_subjects: int | None) -> dict:
        tenant, root = records.owner(record)[0], self.root_of(records.owner(record)[0])
        if idempotency is not None:
            earlier = await asyncio.to_thread(self._idempotent, tenant, *idempotency)
            if earlier is not None:
                return {**earlier, "replayed": True}
        status, _ = await asyncio.to_thread(records.status_of, root, record["id"])
        taken = await asyncio.to_thread(storage.exists, storage.join(root, "subjects", record["id"]))
        if status != "missing" or taken or (tenant, record["id"]) in self.running:
            raise SubjectExists(f"subject {record['id']!r} already exists")
        if max_subjects is not None and len(await asyncio.to_thread(records.list_ids, root)) >= max_subjects:
            raise QuotaExceeded("subjects", f"this tenant stores at most {max_subjects} subjects")
        await asyncio.to_thread(self._save, {**record, "uploading": True})
        if idempotency is not None:
            await asyncio.to_thread(storage.write_json, records.idempotency_uri(root, idempotency[0]),
                                    {"subject_id": record["id"], "body_sha256": idempotency[1]})
        return {**self.view(tenant, record["id"]), "replayed": False}

    async def commit(self, tenant: str, subject_id: str, images: list[str]) -> dict:
        """The reserved subject's images are stored: queue its training."""
        record = await asyncio.to_thread(records.read_state, self.root_of(tenant), subject_id)
        if record is None or record.get("deleting"):
            raise SubjectExists(f"subject {subject_id!r} was deleted while its images were stored")
        await asyncio.to_thread(self._save, {**record, "images": list(images), "uploading": False})
        self._entered(record)
        self.queue.append((tenant, subject_id))
        self._admit()
        return await asyncio.to_thread(self.view, tenant, subject_id)

    def _idempotent(self, tenant: str, key: str, body_sha256: str) -> dict | None:
        root = self.root_of(tenant)
        try:
            seen = storage.read_json(records.idempotency_uri(root, key))
        except FileNotFoundError:
            return None
        if seen["body_sha256"] != body_sha256:
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request body")
        status, _ = records.status_of(root, seen["subject_id"])
        return None if status == "missing" else self.view(tenant, seen["subject_id"])

    def view(self, tenant: str, subject_id: str) -> dict:
        """The record as clients see it, with progress and queue position (no storage paths)."""
        root = self.root_of(tenant)
        status, record = records.status_of(root, subject_id)
        owner = (tenant, subject_id)
        return {"id": subject_id, "status": status, "record": record,
                "progress": records.read_progress(root, subject_id),
                "queue_position": self.queue.index(owner) + 1 if owner in self.queue else None}

    async def positions(self, tenant: str = DEFAULT_TENANT) -> dict[str, int]:
        """The tenant's queued subjects and their places in the service's queue."""
        await self.start()
        return {subject_id: i + 1 for i, (t, subject_id) in enumerate(self.queue) if t == tenant}

    async def training_count(self, tenant: str) -> int:
        return sum(t == tenant for t, _ in self.running)

    async def cancel(self, tenant: str, subject_id: str) -> dict | None:
        """Cancel a queued or training subject; its view (unchanged when already final); None if absent."""
        await self.start()
        owner = (tenant, subject_id)
        record = await asyncio.to_thread(records.read_state, self.root_of(tenant), subject_id)
        if record is None or record.get("deleting"):
            return None
        if record["status"] == "queued":
            self.queue = [o for o in self.queue if o != owner]
            await asyncio.to_thread(self._finish, record, "canceled")
        elif record["status"] == "training":
            await asyncio.to_thread(self._save, {**record, "cancel_requested": True})
            await self._stop_training(owner)
        return await asyncio.to_thread(self.view, tenant, subject_id)

    async def _stop_training(self, owner: Owner) -> None:
        """Interrupt a running training and wait (bounded) until its task has ended and been reaped."""
        import ray

        ref = self.running.get(owner)
        if ref is None:
            return
        ray.cancel(ref, force=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while owner in self.running and time.monotonic() < deadline:
            await self._reap_trainings()
            await asyncio.sleep(0.1)
        if owner in self.running:  # it did not stop: kill its worker
            ray.cancel(self.running[owner], force=True)

    async def delete(self, tenant: str, subject_id: str) -> bool:
        """Erase a subject: stop its training, have every model replica drop it, remove its files.
        False when there was nothing to delete (deleting twice is harmless)."""
        await self.start()
        owner, root = (tenant, subject_id), self.root_of(tenant)
        status, record = await asyncio.to_thread(records.status_of, root, subject_id)
        leftovers = await asyncio.to_thread(storage.list_files, storage.join(root, "subjects", subject_id))
        if status == "missing" and not leftovers:
            return False
        record = record or {"id": subject_id, "tenant": tenant, "status": "ready", "seq": 0}
        await asyncio.to_thread(self._save, {**record, "deleting": True})  # from now on: 404 everywhere
        self.queue = [o for o in self.queue if o != owner]
        await self._stop_training(owner)
        await self._drop_from_replicas(owner)
        from dreamblend_ray.lifecycle.erasure import erase_subject

        await asyncio.to_thread(erase_subject, root, subject_id)
        self._event({**record, "status": "deleted"}, "subject.deleted")
        return True

    async def _drop_from_replicas(self, owner: Owner) -> None:
        self.epoch += 1
        self.deletions.append((self.epoch, owner))
        self.deletions = self.deletions[-1000:]
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline:
            now = time.monotonic()
            live = {r: e for r, (e, seen) in self.replicas.items() if now - seen < REPLICA_STALE_S}
            if all(e >= self.epoch for e in live.values()):
                return
            await asyncio.sleep(0.05)
        logger.warning("subject %s of %s: not every model replica confirmed dropping it within %.0fs",
                       owner[1], owner[0], ACK_TIMEOUT_S)

    async def poll_deletions(self, replica_id: str, processed_epoch: int) -> tuple[int, list[Owner]]:
        """A model replica's heartbeat: it has dropped everything up to ``processed_epoch``; the
        (tenant, subject) pairs deleted after that, and the epoch to confirm next time."""
        await self.start()
        self.replicas[replica_id] = (processed_epoch, time.monotonic())
        return self.epoch, [o for e, o in self.deletions if e > processed_epoch]

    async def sweep_retention(self) -> list[Owner]:
        """Delete finished subjects past their retention, and creates whose upload never finished
        (an hour old); the (tenant, id) pairs deleted."""
        found = [r for tenant in await asyncio.to_thread(records.tenants, self.root)
                 for r in await asyncio.to_thread(records.list_records, self.root_of(tenant))]
        stale = time.time() - 3600
        expired = [records.owner(r) for r in found if not r.get("deleting") and (
            records.expired(r, self.settings.retention_days) or (r.get("uploading") and r["seq"] / 1e9 < stale))]
        for owner in expired:
            logger.info("subject %s of %s: past its retention, deleting", owner[1], owner[0])
            await self.delete(*owner)
        return expired

    # ------------------------------------------------------------------ async generation jobs

    async def submit_job(self, record: dict) -> dict:
        await self.start()
        await asyncio.to_thread(async_jobs.write_job, self.root_of(records.owner(record)[0]), record)
        self.job_queue.append(records.owner(record))
        self._admit_jobs()
        return record

    def _admit_jobs(self) -> None:
        import ray

        while self.job_queue and len(self.jobs_running) < self.settings.max_concurrent_trainings:
            owner = self.job_queue.pop(0)
            root = self.root_of(owner[0])
            record = async_jobs.read_job(root, owner[1])
            if record is None or record["status"] in async_jobs.JOB_FINAL:
                continue
            async_jobs.write_job(root, {**record, "status": "running", "started_at": records.now_iso()})
            s = self.settings
            task = ray.remote(async_jobs.run_job).options(num_cpus=0, max_retries=1, name=f"job:{owner[1]}")
            self.jobs_running[owner] = task.remote(root, owner[1], s.base, s.job_num_cpus, s.job_num_gpus)

    async def _reap_jobs(self) -> None:
        import ray

        for owner, ref in list(self.jobs_running.items()):
            if not ray.wait([ref], timeout=0)[0]:
                continue
            del self.jobs_running[owner]
            root = self.root_of(owner[0])
            record = async_jobs.read_job(root, owner[1])
            if record is None:
                continue
            try:
                results = await ref
                failed = sum(r["status"] != "succeeded" for r in results)
                record = {**record, "status": "succeeded" if not failed else "failed", "results": results,
                          "error": f"{failed} of {len(results)} images failed" if failed else None}
            except Exception as exc:  # noqa: BLE001 - the job fails with its reason
                record = {**record, "status": "failed", "error": f"the job failed: {_error_text(exc)}"}
            record["finished_at"] = records.now_iso()
            async_jobs.write_job(root, record)
            self._event(record, "job.completed", job=True)

    # ------------------------------------------------------------------ storage and webhooks

    def _entered(self, record: dict) -> dict:
        """Count a subject's move to its current state (``dreamblend_trainings``); returns it."""
        metrics.get("trainings").inc(kind="service", state=record["status"], tenant=records.owner(record)[0])
        return record

    def _report_active(self) -> None:
        metrics.get("trainings_active").set(len(self.queue), kind="service", state="queued")
        metrics.get("trainings_active").set(len(self.running), kind="service", state="training")

    def _save(self, record: dict) -> dict:
        records.write_state(self.root_of(records.owner(record)[0]), record)
        return record

    def _event(self, record: dict, event: str, job: bool = False) -> None:
        url = record.get("webhook_url")
        if not url or self.outbox is None:
            return
        data = {"id": record["id"], "status": record["status"], "error": record.get("error"),
                "request_id": record.get("request_id")}
        if job:
            data["images_total"] = record.get("images_total")
        try:
            self.outbox.enqueue(event, url, data, request_id=record.get("request_id"))
        except ValueError as exc:  # no secret, or the URL turned bad: logged, never blocks training
            logger.warning("%s %s: webhook %s not queued: %s", "job" if job else "subject", record["id"], event, exc)

    def _deliver(self) -> None:
        if self.outbox is not None:
            self.outbox.deliver_due()

    async def webhook_backlog(self) -> int:
        return 0 if self.outbox is None else len(await asyncio.to_thread(self.outbox.pending))


def scheduler_handle(settings: ServiceSettings, create: bool = True):
    """The root's scheduler actor: found by name, or started (detached, restarted by Ray forever)."""
    import ray

    if not create:
        try:
            return ray.get_actor(settings.actor_name, namespace=NAMESPACE)
        except ValueError:
            return None
    actor = ray.remote(SubjectScheduler).options(
        name=settings.actor_name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=1000)
    return actor.remote(asdict(settings))
