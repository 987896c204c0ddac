"""The model replica's continuous batch: requests of any loaded LoRA subjects share denoising
steps, join a running batch at its next step, and are answered the moment their rows finish.

    submit(job) -> waiting ──admit at the next step──> active rows ──step──> finished rows
                                                         ^    each row at its own step   │ decoded,
                                                         └─────────────────────────────┘ answered

One asyncio task (:meth:`ContinuousBatch._loop`) runs while there is work: it admits waiting jobs,
then runs one step of every active row (``RowEngine.step``) in a worker thread, with the replica's
UNet lock held for that step only, so a subject's adapters can load between two steps. Jobs admitted
while rows run join them: their G step 0 rides in that step's E call (``RowEngine.step``'s
``joining``), and they take their first guided step with the others at the next step, so an
arrival costs no UNet call of its own. A job is
admitted when its rows can share the active rows' steps (same ``rows.row_key``) and fewer than
``max_requests`` jobs are active; a job that cannot join waits, and jobs that arrived after it wait
behind it, so nobody starves. Jobs past their deadline, or whose caller went away, leave at the
next step. No Ray here: ``serving/app.py`` wires it to the Serve deployment and tests drive it
directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dreamblend_ray.io.images import encode_png
from dreamblend_ray.method.rows import Row, RowEngine, RowRequest, row_key
from dreamblend_ray.method.sampler import to_pil
from dreamblend_ray.serving.batching import GenerationJob, JobOutput
from dreamblend_ray.serving.requests import DeadlineExceeded, FieldError, parse_model_id

logger = logging.getLogger(__name__)


@dataclass
class Pending:
    """A job in the continuous batch: its rows, their images as they finish, and who waits."""

    job: GenerationJob
    adapters: tuple[str, str]  # the (G, E) adapter names of its subject on the UNet
    future: asyncio.Future
    rows: list[Row] = field(default_factory=list)
    pngs: dict[int, bytes] = field(default_factory=dict)
    started: float = 0.0
    arrived: float = field(default_factory=time.perf_counter)
    peers: int = 0  # the most jobs that shared one of its steps
    peer_rows: int = 0

    def requests(self) -> list[RowRequest]:
        job, (g, e) = self.job, self.adapters
        negatives = job.negative_prompts or [None] * len(job.prompts)
        return [RowRequest(prompt, seed, job.config, g, e, negative)
                for prompt, seed, negative in zip(job.prompts, job.seeds, negatives)]

    @property
    def finished(self) -> bool:
        return len(self.pngs) == len(self.job.prompts)

    def output(self) -> JobOutput:
        distances = [sum(row.distances) / len(row.distances) if row.distances else 0.0 for row in self.rows]
        return JobOutput([self.pngs[i] for i in range(len(self.job.prompts))], distances,
                         time.perf_counter() - self.started)


class ContinuousBatch:
    """Step-level batching of row jobs on one replica. ``lock`` guards the UNet (a threading lock)."""

    def __init__(self, engine: RowEngine, lock, max_requests: int, telemetry=None):
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.engine = engine
        self.lock = lock
        self.max_requests = max_requests
        self.waiting: list[Pending] = []
        self.active: list[Pending] = []
        self.steps = 0
        self.telemetry = telemetry  # serving.telemetry.ReplicaTelemetry, or None
        # Every step on one thread: torch's OpenMP team and the allocator's arena stay that thread's
        # (steps hopping between a pool's threads made new teams and arenas: 1.37x static's peak RSS).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamblend-rows")
        self._task: asyncio.Task | None = None

    async def submit(self, job: GenerationJob, adapters: tuple[str, str]) -> tuple[JobOutput, int, int]:
        """Run ``job``'s rows; returns its output and the most jobs / rows that shared a step with it
        (the output is a FieldError when its settings are not the base's, e.g. FLUX.1's true_cfg_scale
        on another family)."""
        pending = Pending(job, adapters, asyncio.get_running_loop().create_future())
        try:
            self._key(pending)  # admission groups by it: a job without one must not reach the loop
        except ValueError as exc:
            return FieldError("settings", str(exc)), pending.peers, pending.peer_rows
        self.waiting.append(pending)
        self._report_queue()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        output = await pending.future  # cancelled with the caller: the loop drops its rows
        return output, pending.peers, pending.peer_rows

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        while self.waiting or self.active:
            admitted = self._admit()
            try:
                await asyncio.get_running_loop().run_in_executor(self._thread, self._step, admitted)
            except Exception as exc:  # noqa: BLE001 - fail these jobs, keep the replica serving
                logger.exception("a continuous-batch step failed")
                self._fail(self.active + admitted, RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _admit(self) -> list[Pending]:
        """Move the waiting jobs that can join the active rows (in arrival order) to ``admitted``."""
        self._drop_gone(self.waiting)
        admitted = []
        key = self._key(self.active[0]) if self.active else None
        while self.waiting and len(self.active) + len(admitted) < self.max_requests:
            head = self.waiting[0]
            key = key if key is not None else self._key(head)
            if self._key(head) != key:
                break  # it waits for the active rows to drain; later arrivals wait behind it
            admitted.append(self.waiting.pop(0))
        self._report_queue()
        return admitted

    def _report_queue(self) -> None:
        if self.telemetry is not None:
            self.telemetry.queue("continuous", len(self.waiting))

    def _key(self, pending: Pending) -> tuple:
        return row_key(pending.job.config, self.engine.components)

    def _step(self, admitted: list[Pending]) -> None:
        """Blocking: start the admitted jobs' rows, then one step of every active row."""
        with self.lock:
            started = self._start(admitted)
            self._drop_gone(self.active)
            rows = [row for pending in self.active for row in pending.rows if not row.done]
            joining = [row for pending in started for row in pending.rows]
            if not rows:  # nothing running: the newcomers step now
                rows, joining = joining, []
            self.active.extend(started)
            for pending in self.active:
                pending.peers = max(pending.peers, len(self.active))
                pending.peer_rows = max(pending.peer_rows, len(rows) + len(joining))
            finished = self.engine.step(rows, joining)
            self.steps += 1
            self._report_step(rows + joining)
            if finished:
                self._finish(finished)

    def _start(self, admitted: list[Pending]) -> list[Pending]:
        """Start the admitted jobs' rows (text encoded together); a job whose rows cannot start is
        answered with the reason and left out, without failing the others."""
        try:
            self._start_rows(admitted)
            return admitted
        except ValueError:
            started = []
            for pending in admitted:
                try:
                    self._start_rows([pending])
                    started.append(pending)
                except ValueError as exc:
                    self._answer(pending, FieldError("settings", str(exc)))
            return started

    def _start_rows(self, jobs: list[Pending]) -> None:
        requests = [(pending, b, request) for pending in jobs for b, request in enumerate(pending.requests())]
        rows = self.engine.start_many([request for *_, request in requests],
                                      [(pending, b) for pending, b, _ in requests])
        for pending in jobs:
            pending.started = time.perf_counter()
            pending.rows = [row for row in rows if row.tag[0] is pending]
            if self.telemetry is not None:
                self.telemetry.first_step("continuous", pending.started - pending.arrived)

    def _finish(self, rows: list[Row]) -> None:
        """Decode the rows that finished this step; answer the jobs whose rows are all done."""
        for row, image in zip(rows, to_pil(self.engine.decode(rows))):
            pending, b = row.tag
            pending.pngs[b] = encode_png(image)
        done = [pending for pending in self.active if pending.finished]
        self.active = [pending for pending in self.active if not pending.finished]
        for pending in done:
            output = pending.output()
            logger.info("%d image(s) in %.2f s, steps shared with up to %d jobs (%d images)", len(output.pngs),
                        output.seconds, pending.peers, pending.peer_rows, extra={"request_id": pending.job.request_id})
            if self.telemetry is not None:
                self.telemetry.images("continuous", len(output.pngs), parse_model_id(pending.job.model_id).tenant)
            self._answer(pending, output)

    def _report_step(self, rows: list[Row]) -> None:
        if self.telemetry is None:
            return
        stats = self.engine.last_step
        self.telemetry.step("continuous", stats.calls, stats.seconds, stats.guidance_s)
        self.telemetry.rows("continuous", sum(not row.done for row in rows))

    def _drop_gone(self, jobs: list[Pending]) -> None:
        """Remove (and answer) the jobs past their deadline or whose caller went away."""
        now = time.time()
        for pending in list(jobs):
            if pending.future.done() or pending.job.deadline <= now:
                jobs.remove(pending)
                self._answer(pending, DeadlineExceeded("deadline passed while sampling"))

    def drop_waiting(self, owner: tuple[str, str], error: Exception) -> int:
        """Answer ``error`` to the waiting (not yet started) jobs of a (tenant, subject); started
        rows finish. Returns how many were dropped."""
        gone = [p for p in self.waiting if parse_model_id(p.job.model_id).owner == owner]
        for pending in gone:
            self.waiting.remove(pending)
            self._answer(pending, error)
        return len(gone)

    def _fail(self, jobs: list[Pending], error: Exception) -> None:
        for pending in jobs:
            self._answer(pending, error)
        self.active = [pending for pending in self.active if pending not in jobs]

    @staticmethod
    def _answer(pending: Pending, value) -> None:
        """Resolve the job's future from any thread (the loop's thread owns the future)."""
        future = pending.future
        loop = future.get_loop()

        def resolve():
            if not future.done():
                future.set_result(value)
        loop.call_soon_threadsafe(resolve)
