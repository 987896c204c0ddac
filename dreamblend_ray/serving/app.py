"""Ray Serve deployments of DreamBlend: an HTTP ingress in front of the model deployment.

    HTTP -> DreamBlendIngress (FastAPI, ``serving.make_api``)
              | handle.options(multiplexed_model_id="subject[@gG,eE]").generate.remote(job)
              v
            DreamBlendModel (autoscaled; base components loaded once per replica)
              @serve.multiplexed: a subject's G/E checkpoint pair, LRU per replica
              continuous batch (``serving/continuous.py``, the default): LoRA subjects' jobs of
                            any subjects share denoising steps and join at the next step
              @serve.batch: the other jobs -> one sampler call per (model id, SamplingConfig)
                            group (``serving/batching.py``), merged with whatever queued while
                            the replica was busy

``deployments/app.py`` re-exports ``build_app`` for ``serve run deployments/serve_config.yaml``;
the classes live in the package so that ``dreamblend serve`` works from an installed wheel.

Concurrency on a replica: the UNet carries every loaded subject's adapters. One lock (``unet_lock``,
FIFO: ``serving/fair_lock.py``) guards it: the continuous batch holds it for one step at a time, a
static group (heat maps, full fine-tunes) also for one of its steps at a time, so the two alternate
step by step and a long static call never stalls the continuous rows; a load holds it only for the
adapters' injection (files are read before). Static
groups are serialised by an asyncio lock, since ``set_adapter`` is global state. Pairs in use are
pinned, so an eviction by the multiplexed LRU never hits a pair in use; adapters are named by
subject and step, shared between pairs, and counted per user (``adopt`` / ``release``). The
blocking work runs in worker threads, so the event loop keeps answering health checks.
"""

import asyncio
import contextlib
import logging
import os
import resource
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from dreamblend_ray.config import DEFAULT_TENANT, SamplingConfig
from dreamblend_ray.observability import context, logs, metrics
from dreamblend_ray.lifecycle.scheduler import scheduler_handle
from dreamblend_ray.lifecycle.settings import ServiceSettings
from dreamblend_ray.serving.subjects_api import ActorService
from dreamblend_ray.serving import batching, http
from dreamblend_ray.training import layout
from dreamblend_ray.serving import requests as serving
from dreamblend_ray.serving.batching import GenerationJob, GenerationResult
from dreamblend_ray.serving.fair_lock import FairRLock
from dreamblend_ray.serving.telemetry import ReplicaTelemetry
from dreamblend_ray.serving.requests import (AppArgs, DeadlineExceeded, FieldError, Overloaded, ReplicaUnavailable,
                                             SubjectNotFound)

logger = logging.getLogger(__name__)

RETRY_MARGIN_S = 0.5  # a retry must be able to finish this long before the request's deadline
DELETION_POLL_S = 0.5  # how often a model replica asks the subject scheduler for deletions
DELETED_MEMORY_S = 30.0  # how long a replica refuses a deleted subject's stragglers


def cluster_node_count() -> int:
    """Alive nodes of the Ray cluster this process belongs to."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def replica_lost(exc: BaseException) -> bool:
    """True when a model call failed because its replica died or vanished (the job itself is fine).

    Through a DeploymentHandle Ray 2.60 raises ``ActorDiedError`` (the worker was killed),
    ``ActorUnavailableError`` (unreachable, maybe restarting; both ``RayActorError``),
    ``WorkerCrashedError``, Serve's ``ReplicaUnavailableError``, or a ``RayTaskError`` wrapping one.
    """
    if isinstance(exc, RayTaskError):
        exc = getattr(exc, "cause", None) or exc
    return isinstance(exc, (RayActorError, WorkerCrashedError, ReplicaUnavailableError))


def adapter_names(pair) -> set[str]:
    """The peft adapters a loaded pair uses on the base UNet (none for a full fine-tune's UNets)."""
    return {name for name in (getattr(pair, "guidance_adapter", None), getattr(pair, "edit_adapter", None)) if name}


class LoadedPair:
    """A subject's checkpoint pair on a replica's UNet; (re)loaded on demand, unloaded on eviction.

    The multiplexed LRU calls ``__del__`` (in an executor thread) when it evicts the model. A pair
    in use is pinned (:meth:`pin` / :meth:`unpin`): an eviction then only marks it, and the last
    unpin unloads it, so eviction never pulls adapters from under rows that are sampling.
    Adapters are named by subject and step and shared between pairs (two (G, E) choices of one
    subject share G's adapter); the replica counts their users and deletes one only when its last
    user unloads (``DreamBlendModel.adopt`` / ``release``).
    """

    def __init__(self, model_id: str, replica: "DreamBlendModel"):
        self.model_id = model_id
        self.tenant, self.subject_id, self.guidance_step, self.edit_step = serving.parse_model_id(model_id)
        self._replica = replica
        self.pair = None
        self.manifest = None
        self.pins = 0
        self.evicted = False
        self._pins_lock = threading.Lock()  # pins of a loaded pair never wait for the UNet lock

    def fetch(self):
        """Blocking, no lock needed: read and check the pair's files (None when already loaded), so
        storage I/O never holds up the rows sampling on the UNet."""
        if self.pair is not None:
            return None
        from dreamblend_ray.training import checkpoints

        with self._load_errors():
            return checkpoints.fetch_pair(layout.tenant_root(self._replica.args.storage_root, self.tenant),
                                          self.subject_id, self._replica.components,
                                          guidance_step=self.guidance_step, edit_step=self.edit_step,
                                          namespace="" if self.tenant == DEFAULT_TENANT else self.tenant)

    def ensure(self, files=None):
        """Blocking; call with the replica's UNet lock held. Returns the pair (``files`` from
        :meth:`fetch`, or read now)."""
        if self.pair is None:
            from dreamblend_ray.training import checkpoints

            files = files or self.fetch()
            with self._load_errors():
                self.pair, self.manifest = checkpoints.attach_pair(files, self._replica.components), files.manifest
            self._replica.adopt(self)
        return self.pair

    @contextlib.contextmanager
    def _load_errors(self):
        """Storage and checkpoint errors as the client-facing ones."""
        try:
            yield
        except FileNotFoundError as exc:
            raise SubjectNotFound(f"subject {self.subject_id!r} has no complete checkpoint pair") from exc
        except ValueError as exc:  # a damaged manifest (424), a step not saved or another base (409)
            raise serving.subject_load_error(self.subject_id, exc) from exc

    def pin(self):
        """Blocking: load if needed and hold the pair until :meth:`unpin`. Returns the pair.

        A loaded pair is pinned without the UNet lock: a request must not wait for the running
        step to count itself in (and out, :meth:`unpin`): that cost every request up to two steps."""
        with self._pins_lock:
            if self.pair is not None and not self.evicted:
                self.pins += 1
                return self.pair
        files = self.fetch()
        with self._replica.unet_lock:
            pair = self.ensure(files)
            with self._pins_lock:
                self.pins += 1
            return pair

    def unpin(self) -> None:
        with self._pins_lock:
            self.pins -= 1
            unload = self.pins == 0 and self.evicted
        if unload:
            with self._replica.unet_lock, self._pins_lock:
                if self.pins == 0:
                    self._unload()

    def close(self) -> None:
        """Evicted: unload now, or when the last user unpins (idempotent)."""
        with self._replica.unet_lock:
            with self._pins_lock:
                self.evicted = True
                idle = self.pins == 0
            if idle:
                self._unload()

    def _unload(self) -> None:
        if self.pair is None:
            return
        self._replica.release(self)
        self.pair = None
        logger.info("unloaded %s", self.model_id)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            logger.exception("failed to unload %s", self.model_id)


@serve.deployment(name="DreamBlendModel")
class DreamBlendModel:
    """Base components once per replica; subject pairs multiplexed; requests batched."""

    def __init__(self, args: dict):
        from dreamblend_ray.models.components import load_components, select_device, select_dtype
        from dreamblend_ray.method.sampler import DreamBlendSampler

        self.args = AppArgs.model_validate(args)
        observe(self.args, "model")
        serving.check_storage_root(self.args.storage_root, cluster_node_count())
        device = select_device(self.args.device)
        self.components = load_components(self.args.base, device=device,
                                           dtype=select_dtype(device, self.args.dtype),
                                           offload_t5=self.args.offload_t5)
        self.sampler = DreamBlendSampler(self.components)
        self.telemetry = ReplicaTelemetry(self.components.family)
        self.static_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamblend-static")
        self.unet_lock = FairRLock()  # re-entrant (a finaliser may run on a thread holding it), FIFO
        self.model_lock = asyncio.Lock()
        self.materialised: dict[str, LoadedPair] = {}  # model id -> its pair on the UNet
        self.adapter_users: Counter = Counter()  # adapter name -> loaded pairs using it
        self.continuous = self._continuous_batch()
        self.pending: list[tuple[GenerationJob, asyncio.Future]] = []  # jobs waiting for the model lock
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.batches = 0

        async def load(model_id: str) -> LoadedPair:
            return await self._load(model_id)

        self.get_pair = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(load)
        self._multiplexed = load  # Serve keeps its LRU on the decorated function (``forget`` evicts from it)
        self.deleted: dict[tuple[str, str], float] = {}  # (tenant, subject) -> when this replica dropped it
        self.deletion_epoch = 0
        self._watcher = None
        self.generate_batch.set_max_batch_size(self.args.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        logger.info("replica %s ready: base %s on %s", self.replica, self.components.source, device)

    @classmethod
    def local(cls, args: AppArgs, components) -> "DreamBlendModel":
        """A replica without Serve (tests, benchmarks): ``components`` loaded, the continuous batch
        as ``args`` asks; no multiplexed LRU (pin ``LoadedPair``s yourself), no deletion watcher."""
        from dreamblend_ray.method.sampler import DreamBlendSampler

        model = cls.__new__(cls)
        model.args, model.components = args, components
        model.sampler = DreamBlendSampler(components)
        model.telemetry = ReplicaTelemetry(components.family)
        model.static_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamblend-static")
        model.unet_lock = FairRLock()
        model.model_lock = asyncio.Lock()
        model.materialised, model.adapter_users, model.pending = {}, Counter(), []
        model.replica, model.batches = "local", 0
        model.deleted, model._watcher = {}, None
        model.continuous = model._continuous_batch()
        return model

    async def _load(self, model_id: str) -> LoadedPair:
        handle = LoadedPair(model_id, self)

        def materialise():
            start = time.perf_counter()
            files = handle.fetch()
            with self.unet_lock:
                handle.ensure(files)
            self.telemetry.loaded(time.perf_counter() - start, len(self.materialised))

        await asyncio.to_thread(materialise)
        return handle

    async def _pair(self, model_id: str) -> LoadedPair:
        """The model's pair through the multiplexed LRU, counted as a cache hit or miss."""
        self.telemetry.cache(hit=model_id in self.materialised)
        return await self.get_pair(model_id)

    def _continuous_batch(self):
        """The step-level batch of LoRA subjects' rows, unless the app asks for static batching or
        the base's scheduler is one that per-row DDIM does not do."""
        if self.args.batching != "continuous":
            return None
        from dreamblend_ray.method.flow_rows import row_engine
        from dreamblend_ray.serving.continuous import ContinuousBatch

        try:
            # the family's engine (Flux, SD3: flow rows); G co-batched into E's call while that call
            # stays within max_batch_size images, so it is never wider than a static batch's
            engine = row_engine(self.components, co_batch=True, co_batch_limit=self.args.max_batch_size)
        except ValueError as exc:
            logger.warning("static batching: %s", exc)
            return None
        return ContinuousBatch(engine, self.unet_lock, self.args.max_batch_size, telemetry=self.telemetry)

    def adopt(self, handle: LoadedPair) -> None:
        """With the UNet lock held: ``handle``'s pair is loaded; count its adapters' users."""
        self.adapter_users.update(adapter_names(handle.pair))  # first: a handle replaced below may unload
        self.materialised[handle.model_id] = handle

    def release(self, handle: LoadedPair) -> None:
        """With the UNet lock held: unload ``handle``'s pair, deleting the adapters no other pair uses."""
        from dreamblend_ray.training import checkpoints

        unused = []
        for name in adapter_names(handle.pair):
            self.adapter_users[name] -= 1
            if self.adapter_users[name] <= 0:
                del self.adapter_users[name]
                unused.append(name)
        if unused:
            checkpoints.remove_adapters(self.components.denoiser, unused)
        if self.materialised.get(handle.model_id) is handle:
            del self.materialised[handle.model_id]
            self.telemetry.evicted(len(self.materialised))

    # ------------------------------------------------------------------ deletions

    def _watch_deletions(self) -> None:
        """Start (once) the poll of the subject scheduler for deleted subjects."""
        if self.args.subjects_service and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._poll_deletions())

    async def _poll_deletions(self) -> None:
        settings, scheduler = ServiceSettings.from_args(self.args.model_dump()), None
        while True:
            try:
                scheduler = scheduler or scheduler_handle(settings, create=False)
                if scheduler is not None:
                    epoch, gone = await scheduler.poll_deletions.remote(self.replica, self.deletion_epoch)
                    for tenant, subject_id in gone:
                        await self.forget(tenant, subject_id)
                    self.deletion_epoch = epoch
            except Exception as exc:  # noqa: BLE001 - the scheduler restarts; look it up again
                logger.debug("deletion poll failed: %r", exc)
                scheduler = None
            await asyncio.sleep(DELETION_POLL_S)

    async def forget(self, tenant: str, subject_id: str) -> None:
        """A deleted subject: refuse its new jobs, drop its waiting ones, unload its pairs once their
        running rows finish (pinned pairs unload at their last unpin)."""
        owner = (tenant, subject_id)
        self.deleted[owner] = time.time()
        self.deleted = {s: t for s, t in self.deleted.items() if time.time() - t < DELETED_MEMORY_S}
        gone = SubjectNotFound(f"subject {subject_id!r} not found")
        if self.continuous is not None:
            self.continuous.drop_waiting(owner, gone)
        for job, future in [entry for entry in self.pending
                            if serving.parse_model_id(entry[0].model_id).owner == owner]:
            self.pending.remove((job, future))
            if not future.done():
                future.set_result(gone)
        cache = getattr(self._multiplexed, "__serve_multiplex_wrapper", None)
        for model_id in [m for m in (cache.models if cache else {}) if serving.parse_model_id(m).owner == owner]:
            handle = cache.models.pop(model_id)
            await asyncio.to_thread(handle.close)
        logger.info("subject %s deleted: dropped from replica %s", subject_id, self.replica)

    def loaded_models(self) -> list[str]:
        return [handle.model_id for handle in self.materialised.values()]

    async def generate(self, job: GenerationJob) -> GenerationResult | Exception:
        """The job's result, or the client-facing exception as a value (raised by the ingress, so its
        type survives the trip instead of arriving wrapped in a RayTaskError)."""
        with context.bound(request=job.request_id, tenant_id=serving.parse_model_id(job.model_id).tenant):
            return await self._generate(job)

    async def _generate(self, job: GenerationJob) -> GenerationResult | Exception:
        self._watch_deletions()
        job.received_at = time.perf_counter()
        model = serving.parse_model_id(job.model_id)
        subject_id = model.subject_id
        if time.time() - self.deleted.get(model.owner, float("-inf")) < DELETED_MEMORY_S:
            return SubjectNotFound(f"subject {subject_id!r} not found")
        refused = self._settings_error(job)
        if refused is not None:
            return refused
        if self.continuous is not None and job.config.row_batchable:
            return await self._generate_rows(job)
        return await self.generate_batch(job)

    def _settings_error(self, job: GenerationJob) -> FieldError | None:
        """A 422 for settings this base does not have (FLUX.1's true_cfg_scale on another family; a
        negative prompt where a flow family runs no classifier-free guidance), before any batch."""
        from dreamblend_ray.method.flow_sampler import negative_without_cfg

        c = self.components
        try:
            cfg = c.model_family.uses_cfg(c, job.config)
        except ValueError as exc:
            return FieldError("true_cfg_scale", str(exc))
        if job.negative_prompts is not None and not cfg and c.model_family.flow_matching:
            return FieldError("negative_prompt", negative_without_cfg(c.model_family))
        return None

    async def _generate_rows(self, job: GenerationJob) -> GenerationResult | Exception:
        """A LoRA subject's job through the continuous batch (a full fine-tune's through the static one)."""
        from dreamblend_ray.method.pair import AdapterPair

        try:
            handle = await self._pair(job.model_id)  # may evict the LRU pair: pinned ones stay
            pair = await asyncio.to_thread(handle.pin)
        except (SubjectNotFound, FieldError) as exc:
            return exc
        try:
            if not isinstance(pair, AdapterPair):
                return await self.generate_batch(job)
            output, jobs, images = await self.continuous.submit(job, (pair.guidance_adapter, pair.edit_adapter))
        finally:
            await asyncio.to_thread(handle.unpin)
        if isinstance(output, Exception):
            return output
        return GenerationResult(pngs=output.pngs, seeds=job.seeds, batch_requests=jobs, batch_images=images,
                                replica=self.replica, loaded_models=self.loaded_models(),
                                sample_seconds=output.seconds, attention_distance=output.distances)

    # Serve forms batches eagerly, even while the replica is busy, so under load it queues many
    # small batches. Many may therefore enter at once (max_concurrent_batches): their jobs join the
    # replica's pending list and the holder of the model lock runs the oldest group with all that is
    # pending for it, so the batches that formed during one sampler call merge into the next.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, max_concurrent_batches=1024)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list:
        """Results (or the exception for that job) in order; one failing group fails only itself."""
        loop = asyncio.get_running_loop()
        waiting = [loop.create_future() for _ in jobs]
        self.pending.extend(zip(jobs, waiting))
        self.telemetry.queue("static", len(self.pending))
        while not all(future.done() for future in waiting):
            async with self.model_lock:
                if not all(future.done() for future in waiting):
                    await self._run_next_group()
        return [future.result() for future in waiting]

    async def _run_next_group(self) -> None:
        """With the model lock held: run the oldest pending group (up to max_batch_size requests)."""
        indices = batching.take_group([job for job, _ in self.pending], self.args.max_batch_size)
        taken = [self.pending[i] for i in indices]
        for i in reversed(indices):
            del self.pending[i]
        self.telemetry.queue("static", len(self.pending))
        group = [job for job, _ in taken]
        try:
            outputs = await self._run_group(group)
        except (SubjectNotFound, DeadlineExceeded, FieldError) as exc:
            outputs = [exc] * len(group)
        except Exception as exc:  # noqa: BLE001 - report, keep the replica serving
            logger.exception("group %s failed", group[0].model_id)
            outputs = [RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")] * len(group)
        for (_, future), output in zip(taken, outputs):
            if not future.done():
                future.set_result(output)

    async def _run_group(self, jobs: list[GenerationJob]) -> list:
        """With the model lock held: load the pair if needed, sample, one result per job."""
        now = time.time()
        live = [job for job in jobs if job.deadline > now]
        if not live:
            return [DeadlineExceeded("deadline passed while queued")] * len(jobs)
        deadline = max(job.deadline for job in live)
        images = sum(len(job.prompts) for job in live)
        last = [time.perf_counter()]

        def stop_when_late(step: int, total: int) -> None:
            now = time.perf_counter()
            self.telemetry.step("static", [images], now - last[0])
            last[0] = now
            if time.time() > deadline:
                raise DeadlineExceeded(f"deadline passed at step {step}/{total}")

        handle = await self._pair(jobs[0].model_id)  # may evict the LRU pair: none is in use
        started = time.perf_counter()
        for job in live:
            self.telemetry.first_step("static", started - (job.received_at or started))
        self.telemetry.rows("static", images)
        last[0] = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self.static_thread, self._sample, handle,
                                                                       live, stop_when_late)
        finally:
            self.telemetry.rows("static", 0)
        loaded = self.loaded_models()
        self.batches += 1
        by_job = dict(zip(map(id, live), outputs))
        results = []
        for job in jobs:
            if id(job) not in by_job:
                results.append(DeadlineExceeded("deadline passed while queued"))
                continue
            output = by_job[id(job)]
            self.telemetry.images("static", len(output.pngs), serving.parse_model_id(job.model_id).tenant)
            logger.info("%d image(s) in %.2f s, a sampler call of %d jobs (%d images)", len(output.pngs),
                        output.seconds, len(live), images, extra={"request_id": job.request_id})
            results.append(GenerationResult(pngs=output.pngs, seeds=job.seeds, batch_requests=len(live),
                                            batch_images=images, replica=self.replica, loaded_models=loaded,
                                            sample_seconds=output.seconds, attention_distance=output.distances,
                                            attention=output.attention))
        return results

    def _sample(self, handle: LoadedPair, jobs: list[GenerationJob], callback):
        """The static path's sampler call. It holds the UNet lock one step at a time, so the
        continuous batch's rows keep stepping between its steps (no request holds them hostage)."""
        pair = handle.pin()
        try:
            return batching.run_group(self.sampler, pair, jobs, callback=callback, step_lock=self.unet_lock)
        finally:
            handle.unpin()

    def process_id(self) -> int:
        """This replica's worker process id (for operators and the replica-loss test)."""
        return os.getpid()

    async def health(self) -> dict:
        """This replica's id, loaded models, batches served and memory (peak RSS)."""
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        steps = 0 if self.continuous is None else self.continuous.steps
        return {"replica": self.replica, "loaded_models": self.loaded_models(), "batches": self.batches,
                "batching": "continuous" if self.continuous is not None else "static", "continuous_steps": steps,
                "device": str(self.components.device), "peak_rss_mb": round(peak / 2**20, 1)}

    async def status(self) -> dict:
        """The status view's numbers for this replica: its batch (``ReplicaTelemetry.snapshot``),
        batching mode, base family and loaded model ids (the ingress keeps the caller's own)."""
        return {"replica": self.replica, "family": self.components.family,
                "batching": "continuous" if self.continuous is not None else "static",
                "loaded_models": self.loaded_models(), **self.telemetry.snapshot()}

    def check_health(self) -> None:
        """Serve's periodic health check of this replica (every health_check_period_s): raising
        makes Serve replace it. The deep check that Kubernetes probes must not make: the base
        model is loaded and, on CUDA, the device still answers (a lost GPU raises here)."""
        if getattr(self, "components", None) is None or getattr(self, "sampler", None) is None:
            raise RuntimeError("the base model is not loaded on this replica")
        device = self.components.device
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.mem_get_info(device)  # a driver query: no sync with the sampling stream


@serve.deployment(name="DreamBlendIngress")
@serve.ingress()
class DreamBlendIngress:
    """FastAPI front: validation, auth, limits, error mapping; forwards jobs to the model."""

    def __init__(self, model: DeploymentHandle, args: dict):
        self.args = AppArgs.model_validate(args)
        observe(self.args, "ingress")
        serving.check_storage_root(self.args.storage_root, cluster_node_count())
        self.model = model
        self.subjects = self._subject_service() if self.args.subjects_service else None
        # Validating a SamplingConfig looks its distance and eta schedule up in method/guidance.py's
        # registries, which loads torch (1.7 s, 182 MiB measured): pay that while the replica
        # starts, not on its first request.
        SamplingConfig()

    def _subject_service(self):
        """The storage root's scheduler actor (started on first use, shared by every ingress replica)."""
        values = {**self.args.model_dump(), "webhook_allow_private": self.args.allow_private_urls,
                  "webhook_allow_loopback": self.args.allow_private_urls}
        return ActorService(scheduler_handle(ServiceSettings.from_args(values)))

    def __serve_build_asgi_app__(self):
        root = self.args.storage_root
        return http.make_api(self.args, backend=self, read_manifest=serving.per_tenant(layout.read_manifest, root),
                             list_subjects=serving.per_tenant(layout.list_subject_ids, root),
                             read_collapse_plot=serving.per_tenant(serving.read_collapse_plot, root),
                             subject_service=self.subjects, behind_proxy=True)

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """The job's result. Generation is deterministic given the job's seeds, so a job whose replica
        died is sent once more (Serve routes it to another replica, or waits for the replacement);
        ReplicaUnavailable (503) when that fails too or could not finish before the deadline."""
        try:
            return await self._generate_once(job)
        except Exception as exc:  # noqa: BLE001 - sorted below
            if not replica_lost(exc):
                raise
            budget = job.deadline - time.time() - RETRY_MARGIN_S
            logger.warning("model replica lost during a %s job (%s); %s", job.model_id, type(exc).__name__,
                           "retrying once" if budget > 0 else "no time left to retry")
            if budget <= 0:
                raise ReplicaUnavailable("the model replica was lost; no time left to retry") from exc
        try:
            return await asyncio.wait_for(self._generate_once(job), timeout=budget)
        except DeadlineExceeded:
            raise
        except TimeoutError as exc:
            raise ReplicaUnavailable("the model replica was lost and the retry did not finish in time") from exc
        except Exception as exc:  # noqa: BLE001 - sorted here
            if replica_lost(exc):
                raise ReplicaUnavailable("the model replica was lost twice") from exc
            raise

    async def _generate_once(self, job: GenerationJob) -> GenerationResult:
        response = self.model.options(multiplexed_model_id=job.model_id).generate.remote(job)
        try:
            result = await response
        except BackPressureError as exc:
            raise Overloaded(str(exc)) from exc
        except DeploymentUnavailableError as exc:  # the model deployment failed to deploy
            raise Overloaded(str(exc)) from exc
        except asyncio.CancelledError:  # the request timed out or the client went away
            response.cancel()
            raise
        if isinstance(result, BaseException):
            raise result
        return result

    async def model_health(self) -> dict:
        return await self.model.health.remote()

    async def model_status(self) -> dict:
        return await self.model.status.remote()


def observe(args: AppArgs, component: str) -> None:
    """A replica's logging (``args.log_format``, the request id on every line) and metrics switch."""
    metrics.set_enabled(args.metrics)
    metrics.keep_gauges_fresh()
    path = logs.install_replica_logging(component, args.log_format)
    logger.info("%s replica logs to %s", component, path)


def build_app(args: AppArgs) -> Application:
    """The typed application builder (``import_path: deployments.app:build_app``).

    ``args`` is an ``AppArgs`` or a dict of its fields (Serve validates YAML ``args:`` into AppArgs).
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    fields = args.model_dump()
    runtime_env = {"env_vars": dict(args.env_vars)} if args.env_vars else {}
    router = RequestRouterConfig(initial_backoff_s=min(0.01, args.router_max_backoff_s),
                                 max_backoff_s=args.router_max_backoff_s)
    model = DreamBlendModel.options(
        autoscaling_config=args.autoscaling_config(),
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "runtime_env": runtime_env},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        graceful_shutdown_timeout_s=max(5.0, min(args.request_timeout_s, 60.0)),
        health_check_period_s=args.health_check_period_s,
        request_router_config=router,
    ).bind(fields)
    return DreamBlendIngress.options(
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": args.ingress_num_cpus, "runtime_env": runtime_env},
        max_ongoing_requests=max(64, 4 * args.max_ongoing_requests),
        request_router_config=router,
    ).bind(model, fields)
