"""Bulk personalization: fine-tune every subject of a manifest on a Ray Data actor pool.

Pipeline (``run_finetune_job``)::

    subjects manifest ──validate (driver)──> one row per subject
      └─ map_batches(FinetuneActor, ActorPoolStrategy(size=N), batch_size=1)
           each actor loads the base model once; per subject:
             subject.json present  -> "skipped"   (reruns are idempotent)
             else finetune_subject -> "succeeded" | "failed" (error recorded, others go on)
             with --attention-probe: then the collapse probe (evaluation.collapse) writes
             subject.json's attention_probe and subjects/{id}/collapse.png
             with pair choice on: then auto_choose_pair rewrites subject.json with the
             chosen guidance/edit steps (a complete subject without a pair_choice entry, or
             without attention_probe when the probe is on, is only scored, not re-trained)
      └─ each finished subject's row is saved at once to {output}/runs/{run_id}/rows/{id}.parquet
         (by its actor; by the driver for a skipped one), so a run whose driver dies can be read
      └─ driver streams the result rows (a log line per subject) and gathers them into
         {output}/runs/{run_id}/results.parquet; if the execution fails, the subjects that did not
         finish become failed rows with the reason, and the table is still written

Before any actor starts, the driver checks the subjects file, the base model (a local folder or an
s3:// prefix must hold model_index.json) and the output root (job.json is written there first), so
those mistakes fail in seconds with one line. Each subject's FinetuneConfig is built and validated
once, there (the flags, then the manifest row's overrides); it reaches its actor as exact JSON
(``config.to_dict`` / ``from_dict``) in the subject's row, with the subject.json the driver already
read when only the pair is left to choose. ``gather_results`` (``--gather --run-id ID``) builds
the results table of a run whose driver died, from the rows it left. The command line is in
``jobs/cli.py``.

Checkpoints land under ``{output}/subjects/{id}/`` (see ``checkpoints``).

A pair-choice failure (e.g. a bad --clip-model) marks the subject "failed" with the error, but its
checkpoints and the fine-tuning's subject.json are kept: they are complete and usable with the
default pair, and a rerun with pair choice on scores them without training again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import pyarrow as pa
import torch

from dreamblend_ray.models.components import load_components, select_device
from dreamblend_ray.training import checkpoints, layout
from dreamblend_ray.training.finetune import finetune_subject, image_uris, read_image

from dreamblend_ray.runtime import lifecycle

from dreamblend_ray.jobs import run_records

from dreamblend_ray.io import storage
from dreamblend_ray.observability import metrics
from dreamblend_ray.observability.metrics import failure_reason
from dreamblend_ray.config import DEFAULT_TENANT, FinetuneConfig, from_dict, to_dict
from dreamblend_ray.jobs.common import (TASK_RETRIES, JobResources, check_base, error_text, new_run_id, read_parquet,
                                       run_uri, write_parquet)
from dreamblend_ray.jobs.manifests import SubjectSpec, apply_overrides, read_subjects
from dreamblend_ray.evaluation.pair_choice import (PairChoiceOptions, ScorerPlugin, auto_choose_pair, register_scorer,
                                                   scorer_plugin)
from dreamblend_ray.evaluation.collapse import (PROBE_PROMPT_PROVIDERS, ProbeOptions, probe_is_current, record_probe,
                                               register_probe_prompts)

logger = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([
    ("subject_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("steps", pa.int64()), ("saved_steps", pa.list_(pa.int64())), ("final_loss", pa.float64()),
    ("seconds", pa.float64()), ("guidance_step", pa.int64()), ("edit_step", pa.int64()),
    ("manifest_uri", pa.string()), ("guidance_checkpoint", pa.string()),
    ("edit_checkpoint", pa.string()), ("checkpoint_uris", pa.list_(pa.string())),
    ("worker", pa.string()),
    # The attention probe (--attention-probe): collapse score per probed step, and the base model's.
    ("probe_steps", pa.list_(pa.int64())), ("collapse_scores", pa.list_(pa.float64())),
    ("base_collapse", pa.float64()),
])
STATUSES = ("succeeded", "skipped", "failed")


def result_row(subject_id: str, status: str, output: str, seconds: float, manifest: dict | None = None,
               error: str | None = None) -> dict:
    """One results-table row; checkpoint fields come from the subject manifest when there is one."""
    import socket

    row = {name: None for name in RESULT_SCHEMA.names}
    row.update(subject_id=subject_id, status=status, error=error, seconds=seconds,
               worker=f"{socket.gethostname()}:{os.getpid()}")
    if manifest:
        saved = list(manifest["steps"])
        losses = manifest.get("loss_curve") or []
        last = losses[-1] if losses else None
        row.update(steps=max(saved), saved_steps=saved, guidance_step=manifest["guidance_step"],
                   edit_step=manifest["edit_step"], manifest_uri=layout.manifest_uri(output, subject_id),
                   final_loss=float(last[-1] if isinstance(last, (list, tuple)) else last)
                   if last is not None else None,
                   checkpoint_uris=[layout.checkpoint_uri(output, subject_id, s) for s in saved],
                   guidance_checkpoint=layout.checkpoint_uri(output, subject_id, manifest["guidance_step"]),
                   edit_checkpoint=layout.checkpoint_uri(output, subject_id, manifest["edit_step"]))
        probe = manifest.get("attention_probe")
        if probe:
            row.update(probe_steps=[r["step"] for r in probe["rows"]],
                       collapse_scores=[float(r["collapse"]) for r in probe["rows"]],
                       base_collapse=float(probe["base"]["collapse"]))
    return row


def needs_pair_choice(manifest: dict, options: PairChoiceOptions | None) -> bool:
    """Pair choice is on and this complete subject has no recorded choice yet."""
    return options is not None and "pair_choice" not in manifest


def probe_options(pair_choice: PairChoiceOptions | None, attention_probe: bool) -> ProbeOptions | None:
    """The probe a job runs per subject: the attention pair choice's (which needs it), else the
    default probe with ``--attention-probe``, else None."""
    if pair_choice is not None and pair_choice.scorer == "attention":
        return ProbeOptions.of_pair_choice(pair_choice)
    return ProbeOptions() if attention_probe else None


def needs_work(manifest: dict, options: PairChoiceOptions | None, probe: ProbeOptions | None) -> bool:
    """This complete subject still needs its pair chosen or its attention probe run."""
    return needs_pair_choice(manifest, options) or (probe is not None and "attention_probe" not in manifest)


def drop_subject_adapters(unet, subject_id: str) -> None:
    """Remove adapters a failed pair choice may have left loaded (named ``{subject_id}--...``)."""
    names = [n for n in (getattr(unet, "peft_config", None) or {}) if n.startswith(f"{subject_id}--")]
    if names:
        checkpoints.remove_adapters(unet, names)


class FinetuneActor:
    """A Ray Data callable class: loads the base model once, then fine-tunes one subject per row.

    ``pair_choice``: a ``PairChoiceOptions`` as a dict (``config.to_dict``), or None for no choice;
    ``scorer``: its scorer's plugin as the driver resolved it, registered here before the options are
    rebuilt (a scorer the driver registered, like the embedded one, is not registered in an actor's process).
    ``run``: the run's URI; each subject's row is saved under it as soon as the subject ends
    (``run_records``). None saves nothing. ``attention_probe``: run the collapse probe
    (``evaluation.collapse``) on each subject's checkpoints (always on with the attention pair choice);
    ``probe_prompts``: the driver's probe-prompt providers (source -> provider), registered here like ``scorer``.
    """

    def __init__(self, base: str, output: str, torch_threads: int, use_gpu: bool,
                 pair_choice: dict | None = None, run: str | None = None, scorer: ScorerPlugin | None = None,
                 attention_probe: bool = False, probe_prompts: dict | None = None):
        torch.set_num_threads(torch_threads)
        self.output, self.run = output, run
        if pair_choice and scorer is not None:
            register_scorer(pair_choice["scorer"], scorer)
        self.pair_choice = PairChoiceOptions.from_dict(pair_choice) if pair_choice else None
        self.probe = probe_options(self.pair_choice, attention_probe)
        for source, provider in (probe_prompts or {}).items():
            register_probe_prompts(source, provider)
        self.components = load_components(base, device=select_device() if use_gpu else "cpu")
        logger.info("finetune actor ready: base %s on %s, %d torch threads", self.components.source,
                    self.components.device, torch_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for item in batch.to_pylist():
            rows.append(self.run_one(item))
            if self.run:
                run_records.save_row(self.run, rows[-1], RESULT_SCHEMA)
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    def run_one(self, row: dict) -> dict:
        """One subject of ``subject_items``: its ``config`` (JSON of a validated FinetuneConfig) and,
        for a subject the driver found complete but without a chosen pair, its ``manifest``."""
        start = time.perf_counter()
        subject_id = row["subject_id"]
        try:
            manifest = json.loads(row["manifest"]) if row.get("manifest") else None
            if manifest is None and layout.is_complete(self.output, subject_id):  # finished meanwhile
                manifest = layout.read_manifest(self.output, subject_id)
            if manifest is not None:
                if not needs_work(manifest, self.pair_choice, self.probe):
                    logger.info("subject %s: already complete, skipped", subject_id)
                    return result_row(subject_id, "skipped", self.output, time.perf_counter() - start, manifest)
                logger.info("subject %s: fine-tuned earlier, probing / choosing its pair", subject_id)
                images = [read_image(u) for u in image_uris(list(row["images"]))]
                return self.after_training(row, manifest, images, start)
            uris = image_uris(list(row["images"]))
            config = from_dict(FinetuneConfig, json.loads(row["config"]))
            # With pair choice or the probe the images are read once here: training and scoring share them.
            images = [read_image(u) for u in uris] if self.pair_choice or self.probe else uris
            metrics.get("trainings").inc(kind="job", state="training", tenant=DEFAULT_TENANT)
            manifest = finetune_subject(self.components, images, row["class_noun"], subject_id, self.output,
                                        config, progress=False)
            metrics.get("trainings").inc(kind="job", state="ready", tenant=DEFAULT_TENANT)
            logger.info("subject %s: fine-tuned in %.1fs", subject_id, time.perf_counter() - start)
            return self.after_training(row, manifest, images, start)
        except Exception as exc:  # noqa: BLE001 - one bad subject must not stop the others
            logger.exception("subject %s failed", subject_id)
            metrics.get("trainings").inc(kind="job", state="failed", tenant=DEFAULT_TENANT)
            metrics.get("training_failures").inc(kind="job", reason=failure_reason(exc))
            return result_row(subject_id, "failed", self.output, time.perf_counter() - start,
                              error=error_text(exc))

    def after_training(self, row: dict, manifest: dict, images: list, start: float) -> dict:
        """The attention probe (when on and not current), then the pair choice (when on and not
        recorded); a probe failure is recorded in the row and keeps the (complete) manifest."""
        subject_id = row["subject_id"]
        if self.probe is not None and not probe_is_current(manifest, self.probe):
            try:
                manifest = record_probe(self.output, subject_id, self.components, images, self.probe)
            except Exception as exc:  # noqa: BLE001 - recorded in the row; the checkpoints stay usable
                logger.exception("subject %s: attention probe failed", subject_id)
                drop_subject_adapters(self.components.denoiser, subject_id)
                return result_row(subject_id, "failed", self.output, time.perf_counter() - start, manifest,
                                  error=f"attention probe failed (checkpoints and subject.json kept): "
                                        f"{error_text(exc)}")
        if needs_pair_choice(manifest, self.pair_choice):
            return self.choose_pair(row, manifest, images, start)
        return result_row(subject_id, "succeeded", self.output, time.perf_counter() - start, manifest)

    def choose_pair(self, row: dict, manifest: dict, images: list, start: float) -> dict:
        """Score the checkpoints and record the pair; a failure keeps the (complete) manifest."""
        subject_id = row["subject_id"]
        try:
            manifest = auto_choose_pair(self.output, subject_id, self.components, images, row["class_noun"],
                                        manifest["token"], self.pair_choice)
        except Exception as exc:  # noqa: BLE001 - recorded in the row; the checkpoints stay usable
            logger.exception("subject %s: pair choice failed", subject_id)
            drop_subject_adapters(self.components.denoiser, subject_id)
            return result_row(subject_id, "failed", self.output, time.perf_counter() - start, manifest,
                              error=f"pair choice failed (checkpoints and subject.json kept, default pair "
                                    f"G={manifest['guidance_step']}, E={manifest['edit_step']}): "
                                    f"{error_text(exc)}")
        logger.info("subject %s: pair chosen (G=%d, E=%d) after %.1fs", subject_id, manifest["guidance_step"],
                    manifest["edit_step"], time.perf_counter() - start)
        return result_row(subject_id, "succeeded", self.output, time.perf_counter() - start, manifest)


@dataclass
class FinetuneJobResult:
    run_id: str
    results_uri: str
    rows: list[dict]
    seconds: float

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0


def subject_items(specs: list[SubjectSpec], base_config: FinetuneConfig) -> list[dict]:
    """Dataset rows; a subject with overrides gets ``base_config`` with them, validated here, in
    the driver. ``config`` is the exact JSON of the subject's FinetuneConfig; ``manifest`` (JSON;
    "" when none) is filled by ``already_complete`` for a subject that only needs its pair chosen."""
    items = []
    for spec in specs:
        try:
            config = apply_overrides(base_config, spec.overrides) if spec.overrides else base_config
        except ValueError as exc:
            raise ValueError(f"subject {spec.subject_id!r}: {exc}") from exc
        items.append({"subject_id": spec.subject_id, "class_noun": spec.class_noun,
                      "images": list(spec.images), "config": json.dumps(to_dict(config)), "manifest": ""})
    return items


def already_complete(items: list[dict], output: str, pair_choice: PairChoiceOptions | None = None,
                     run: str | None = None, attention_probe: bool = False) -> list[dict]:
    """"skipped" rows for subjects whose manifest exists (checked concurrently, from the driver,
    so a finished rerun starts no actors); actors check again before they train. With pair choice
    on, a subject whose manifest has no ``pair_choice`` entry is not done yet: its item gets the
    manifest read here (``item["manifest"]``), so its actor only chooses the pair (likewise one
    without an ``attention_probe`` when the probe is on). Each row is saved under ``run`` (when
    given), like the actors' rows."""
    from concurrent.futures import ThreadPoolExecutor

    probe = probe_options(pair_choice, attention_probe)

    def check(item):
        start = time.perf_counter()
        if not layout.is_complete(output, item["subject_id"]):
            return None
        manifest = layout.read_manifest(output, item["subject_id"])
        if needs_work(manifest, pair_choice, probe):
            item["manifest"] = json.dumps(manifest)
            return None
        row = result_row(item["subject_id"], "skipped", output, time.perf_counter() - start, manifest)
        if run:
            run_records.save_row(run, row, RESULT_SCHEMA)
        return row

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [row for row in pool.map(check, items) if row is not None]


def fine_tune_all(items: list[dict], output: str, base: str, resources: JobResources, address: str | None,
                  total: int, done: int, pair_choice: PairChoiceOptions | None = None, run: str | None = None,
                  rows: list[dict] | None = None, attention_probe: bool = False) -> list[dict]:
    """Run ``items`` through the FinetuneActor pool; log each subject as its row arrives.

    Rows are appended to ``rows`` (a new list by default) as they arrive, so a caller keeps the
    ones that came before a failure of the execution."""
    lifecycle.init_ray(address)
    import ray.data

    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        FinetuneActor, fn_constructor_kwargs={"base": base, "output": output,
                                              "torch_threads": resources.threads,
                                              "use_gpu": resources.gpus_per_actor > 0,
                                              "pair_choice": to_dict(pair_choice) if pair_choice else None,
                                              "scorer": scorer_plugin(pair_choice.scorer) if pair_choice else None,
                                              "run": run, "attention_probe": attention_probe,
                                              "probe_prompts": dict(PROBE_PROMPT_PROVIDERS)},
        **resources.map_batches_args())
    # A task whose actor died more than TASK_RETRIES times loses its block; the other subjects go
    # on, and the driver gives the lost one a failed row (ACTOR_DIED).
    dataset.context.max_errored_blocks = -1
    rows = [] if rows is None else rows
    for row in dataset.iter_rows():
        rows.append(dict(row))
        logger.info("[%d/%d] %s: %s%s (%.1fs)", done + len(rows), total, row["subject_id"], row["status"],
                    f" - {row['error']}" if row["error"] else "", row["seconds"])
    return rows


def run_finetune_job(subjects: str | list[SubjectSpec], output: str, *, base: str = "embedded",
                     config: FinetuneConfig = FinetuneConfig(), resources: JobResources = JobResources(),
                     run_id: str | None = None, address: str | None = None,
                     pair_choice: PairChoiceOptions | None = None,
                     attention_probe: bool = False) -> FinetuneJobResult:
    """Fine-tune every subject into ``output``; returns (and writes) the results table.

    ``pair_choice``: when given, each fine-tuned subject's checkpoints are scored and the chosen
    (guidance, edit) pair is recorded in its subject.json (see ``pair_choice.auto_choose_pair``);
    the rows' guidance/edit steps are the chosen ones. ``attention_probe``: run the collapse probe
    on each subject's checkpoints (``evaluation.collapse``; subject.json's ``attention_probe``,
    ``subjects/{id}/collapse.png``, the rows' probe columns); the "attention" pair choice runs it anyway.
    """
    if pair_choice is not None and not isinstance(pair_choice, PairChoiceOptions):
        raise ValueError(f"pair_choice must be a PairChoiceOptions or None, got {type(pair_choice).__name__}")

    start = time.perf_counter()
    specs = read_subjects(subjects) if isinstance(subjects, str) else list(subjects)
    items = subject_items(specs, config)
    base = check_base(base)
    run_id = run_id or new_run_id()
    run = run_uri(output, run_id)
    # Written first: a missing bucket, denied access or an unwritable root fails here, before any actor starts.
    storage.write_json(storage.join(run, "job.json"), {
        "kind": "finetune", "run_id": run_id, "base": base, "subjects": len(items),
        "subject_ids": [item["subject_id"] for item in items],
        "source": subjects if isinstance(subjects, str) else None, "config": to_dict(config),
        "resources": to_dict(resources), "pair_choice": to_dict(pair_choice) if pair_choice else None,
        "attention_probe": bool(attention_probe),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    logger.info("run %s: %d subjects -> %s on %d actor(s)", run_id, len(items), output, resources.num_actors)

    rows = already_complete(items, output, pair_choice, run, attention_probe)
    todo = [item for item in items if item["subject_id"] not in {r["subject_id"] for r in rows}]
    logger.info("run %s: %d of %d subjects already complete, %d to fine-tune", run_id, len(rows),
                len(items), len(todo))
    reason = UNFINISHED
    if todo:
        try:
            fine_tune_all(todo, output, base, resources, address, total=len(items), done=len(rows),
                          pair_choice=pair_choice, run=run, rows=rows, attention_probe=attention_probe)
        except Exception as exc:  # noqa: BLE001 - what finished is kept; the rest become failed rows
            logger.error("run %s: the job failed after %d of %d subjects ended: %s", run_id, len(rows),
                         len(items), error_text(exc))
            reason = f"the job failed before this subject finished ({error_text(exc, 1000)}); rerun to complete it"
        else:
            reason = ACTOR_DIED
    return gather_results(output, run_id, [item["subject_id"] for item in items], rows, reason, start)


UNFINISHED = "unfinished: the run ended before this subject did (no result row); rerun to complete it"
# Ray core retries the task TASK_RETRIES times; on a loaded machine one more try sometimes happens
# (4 deaths instead of 3 in 2 of 6 test runs on a loaded 2-core machine; likely Ray Data
# re-dispatching the block when it sees the actor die before Ray core reports the failed try).
ACTOR_DIED = (f"no result: the actor fine-tuning this subject died {TASK_RETRIES + 1} or more times (killed, "
              "out of memory, or its node was lost); rerun to try again")


def gather_results(output: str, run_id: str, subject_ids: list[str] | None = None, rows: list[dict] = (),
                   reason: str = UNFINISHED, start: float | None = None) -> FinetuneJobResult:
    """The results table of a run, gathered from ``rows`` and the rows saved under the run, and
    written to ``runs/{run_id}/results.parquet``.

    ``subject_ids``: the run's subjects (default: those recorded in its job.json). A subject with no
    row becomes a failed row whose error is ``reason``. Reads a run whose driver died, too
    (``jobs/finetune_subjects.py --gather --run-id ID``); starts no Ray.
    """
    start = time.perf_counter() if start is None else start
    run = run_uri(output, run_id)
    if subject_ids is None:
        subject_ids = list(storage.read_json(storage.join(run, "job.json"))["subject_ids"])
    by_id = {row["subject_id"]: row for row in rows}
    saved_late = run_records.save_missing(run, list(rows), RESULT_SCHEMA)
    if saved_late:
        logger.info("run %s: saved %d result row(s) an actor could not", run_id, saved_late)
    missing = [s for s in subject_ids if s not in by_id]
    if missing:
        by_id.update(run_records.read_rows(run, missing))
    gathered = [by_id.get(s) or result_row(s, "failed", output, 0.0, error=reason) for s in sorted(subject_ids)]
    results_uri = write_parquet(storage.join(run, "results.parquet"), gathered, RESULT_SCHEMA)
    result = FinetuneJobResult(run_id, results_uri, gathered, time.perf_counter() - start)
    logger.info("run %s done in %.1fs: %d succeeded, %d skipped, %d failed; results %s", run_id,
                result.seconds, result.count("succeeded"), result.count("skipped"), result.count("failed"),
                results_uri)
    return result


def read_results(output: str, run_id: str) -> list[dict]:
    """The rows of a run's results.parquet (see ``gather_results`` for a run that did not end)."""
    return read_parquet(storage.join(run_uri(output, run_id), "results.parquet"))
