"""Bulk DreamBlend generation: rows of (subject, prompt, seed, num_images, settings) -> PNGs + index.

Pipeline (``run_generate_job``)::

    requests (JSONL/Parquet) ──validate (driver)──> grouped by (subject, G step, E step),
      large groups split into tasks of at most ``max_images_per_task`` images
      └─ map_batches(GenerateActor, ActorPoolStrategy(size=N), batch_size=1)
           per task: load the checkpoint pair once, batch prompts that share settings into
           DreamBlendSampler.sample calls of at most ``batch_size`` images, write PNGs
      └─ {output}/images/{subject_id}/{row}-{k}.png and {output}/runs/{run_id}/index.parquet

Grouping happens in the driver: the request table is small metadata, and one task per group
means an actor loads each pair exactly once per task, without a shuffle stage. Each request's
SamplingConfig (the job's settings with the row's own) is built and validated once, there too,
and travels in the task as exact JSON (``config.to_dict`` / ``from_dict``).
Images are batch invariant (each depends only on its own prompt, seed and settings), so
batching never changes a picture. The command line is in ``jobs/cli.py``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import torch

from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models.components import load_components, select_device, select_dtype
from dreamblend_ray.training import checkpoints

from dreamblend_ray.runtime import lifecycle

from dreamblend_ray.io import storage
from dreamblend_ray.io.images import encode_png
from dreamblend_ray.config import SamplingConfig, check_range, from_dict, to_dict
from dreamblend_ray.dtypes import normalize_dtype
from dreamblend_ray.jobs.common import (JobResources, check_base, error_text, new_run_id, run_uri,
                                       write_parquet)
from dreamblend_ray.jobs.manifests import GenerationRequest, load_requests, request_configs

logger = logging.getLogger(__name__)

BATCH_SIZE = 8  # images per sampler call
MAX_IMAGES_PER_TASK = 256  # a subject's rows are split into tasks of at most this many images

INDEX_SCHEMA = pa.schema([
    ("row", pa.int64()), ("k", pa.int64()), ("subject_id", pa.string()), ("prompt", pa.string()),
    ("seed", pa.int64()), ("image_uri", pa.string()), ("seconds", pa.float64()), ("status", pa.string()),
    ("error", pa.string()), ("guidance_step", pa.int64()), ("edit_step", pa.int64()),
    ("settings", pa.string()),
])


def image_uri(output: str, subject_id: str, row: int, k: int) -> str:
    """Where image k of a request goes (``subject_id`` was validated with its request)."""
    return storage.join(output, "images", subject_id, f"{int(row)}-{int(k)}.png")


def index_row(request: dict, k: int, seconds: float, uri: str | None = None, error: str | None = None,
              steps: tuple = (None, None)) -> dict:
    return {"row": request["row"], "k": k, "subject_id": request["subject_id"], "prompt": request["prompt"],
            "seed": request["seed"] + k, "image_uri": uri, "seconds": seconds,
            "status": "failed" if error else "succeeded", "error": error,
            "guidance_step": steps[0], "edit_step": steps[1],
            "settings": json.dumps(request["settings"], sort_keys=True)}


def sampler_batches(requests: list[dict], batch_size: int) -> list[list[tuple[dict, int]]]:
    """(request, k) image entries, grouped by SamplingConfig and negative-prompt use, in chunks."""
    groups: dict[tuple, list] = {}
    for request in requests:
        key = (json.dumps(request["config"], sort_keys=True), request["negative_prompt"] is not None)
        groups.setdefault(key, []).extend((request, k) for k in range(request["num_images"]))
    return [entries[i:i + batch_size] for entries in groups.values() for i in range(0, len(entries), batch_size)]


class GenerateActor:
    """A Ray Data callable class: base model and sampler loaded once; one (subject, steps) task per row."""

    def __init__(self, base: str, checkpoints_root: str, output: str, batch_size: int,
                 torch_threads: int, use_gpu: bool, dtype: str | None = None):
        torch.set_num_threads(torch_threads)
        device = select_device() if use_gpu else torch.device("cpu")
        self.components = load_components(base, device=device, dtype=select_dtype(device, dtype))
        self.sampler = DreamBlendSampler(self.components)
        self.root, self.output, self.batch_size = checkpoints_root, output, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for task in batch.to_pylist() for r in self.run_task(task)]
        return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)

    def run_task(self, task: dict) -> list[dict]:
        requests = json.loads(task["requests"])
        subject_id = task["subject_id"]
        start = time.perf_counter()
        try:
            pair, manifest = checkpoints.load_pair(self.root, subject_id, self.components,
                                                   task["guidance_step"], task["edit_step"])
        except Exception as exc:  # noqa: BLE001 - recorded per image; other subjects go on
            logger.error("subject %s: cannot load its checkpoint pair: %s", subject_id, exc)
            error = error_text(exc)
            return [index_row(r, k, time.perf_counter() - start, error=error)
                    for r in requests for k in range(r["num_images"])]
        steps = (pair.meta["guidance_step"], pair.meta["edit_step"])
        logger.info("subject %s: pair G=%d E=%d loaded in %.2fs", subject_id, *steps, time.perf_counter() - start)
        try:
            return [row for entries in sampler_batches(requests, self.batch_size)
                    for row in self.sample(pair, entries, steps)]
        finally:
            checkpoints.unload_pair(pair, self.components)

    def sample(self, pair, entries: list[tuple[dict, int]], steps: tuple) -> list[dict]:
        first = entries[0][0]
        start = time.perf_counter()
        try:
            config = from_dict(SamplingConfig, first["config"])
            negatives = [r["negative_prompt"] for r, _ in entries] if first["negative_prompt"] is not None else None
            result = self.sampler.sample(pair, [r["prompt"] for r, _ in entries],
                                         [r["seed"] + k for r, k in entries], config, negatives)
            per_image = (time.perf_counter() - start) / len(entries)
            rows = []
            for (request, k), image in zip(entries, result.images):
                uri = image_uri(self.output, request["subject_id"], request["row"], k)
                storage.write_bytes(uri, encode_png(image))
                rows.append(index_row(request, k, per_image, uri, steps=steps))
            return rows
        except Exception as exc:  # noqa: BLE001 - this batch fails, the rest go on
            logger.exception("subject %s: a batch of %d images failed", first["subject_id"], len(entries))
            per_image = (time.perf_counter() - start) / len(entries)
            return [index_row(r, k, per_image, error=error_text(exc), steps=steps) for r, k in entries]


def group_tasks(requests: list[GenerationRequest], max_images_per_task: int,
                configs: list[SamplingConfig] | None = None) -> list[dict]:
    """One task per (subject, G step, E step), split so no task exceeds ``max_images_per_task``.

    Each request's row carries its SamplingConfig (``configs``, one per request; default: the
    request's settings over the defaults) as ``config``, a ``config.to_dict``."""
    configs = request_configs(requests, SamplingConfig()) if configs is None else configs
    groups: dict[tuple, list[dict]] = {}
    for request, config in zip(requests, configs, strict=True):
        key = (request.subject_id, request.guidance_step, request.edit_step)
        groups.setdefault(key, []).append({**asdict(request), "config": to_dict(config)})
    tasks = []
    for (subject_id, g, e), rows in groups.items():
        chunk, size = [], 0
        for row in rows:
            if chunk and size + row["num_images"] > max_images_per_task:
                tasks.append((subject_id, g, e, chunk))
                chunk, size = [], 0
            chunk.append(row)
            size += row["num_images"]
        tasks.append((subject_id, g, e, chunk))
    return [{"subject_id": s, "guidance_step": g, "edit_step": e, "requests": json.dumps(chunk)}
            for s, g, e, chunk in tasks]


def unfinished_rows(requests: list[GenerationRequest], index: list[dict], reason: str) -> list[dict]:
    """Failed index rows, with ``reason``, for every requested image that ``index`` lacks."""
    done = {(r["row"], r["k"]) for r in index}
    return [index_row(asdict(request), k, 0.0, error=reason) for request in requests
            for k in range(request.num_images) if (request.row, k) not in done]


@dataclass
class GenerateJobResult:
    run_id: str
    index_uri: str
    rows: list[dict]
    seconds: float

    @property
    def failed(self) -> int:
        return sum(row["status"] == "failed" for row in self.rows)


def run_generate_job(requests: str | list[GenerationRequest], output: str, *, checkpoints_root: str | None = None,
                     base: str = "embedded", settings: SamplingConfig | dict | None = None,
                     batch_size: int = BATCH_SIZE, max_images_per_task: int = MAX_IMAGES_PER_TASK,
                     resources: JobResources = JobResources(), run_id: str | None = None,
                     address: str | None = None, dtype: str | None = None) -> GenerateJobResult:
    """Generate every requested image into ``output``; returns (and writes) the index table.

    settings: the SamplingConfig of every row (a row's own settings win), or its fields as a
    dict (``config.from_dict``: unknown keys are an error).
    checkpoints_root: where the subjects were fine-tuned (default: ``output``).
    dtype: the actors' weights dtype (``dtypes``: fp32/fp16/bf16 or an alias; None: per device).
    """
    start = time.perf_counter()
    check_range("batch_size", batch_size, 1, 1024, integer=True)
    check_range("max_images_per_task", max_images_per_task, 1, 1_000_000, integer=True)
    dtype = normalize_dtype(dtype)
    base_config = settings if isinstance(settings, SamplingConfig) else from_dict(SamplingConfig, settings or {})
    if isinstance(requests, str):
        rows, configs = load_requests(requests, base_config)
    else:
        rows = list(requests)
        configs = request_configs(rows, base_config)
    tasks = group_tasks(rows, max_images_per_task, configs)
    base, root = check_base(base), checkpoints_root or output
    run_id = run_id or new_run_id()
    run = run_uri(output, run_id)
    storage.write_json(storage.join(run, "job.json"), {
        "kind": "generate", "run_id": run_id, "base": base, "checkpoints": root, "rows": len(rows),
        "images": sum(r.num_images for r in rows), "settings": to_dict(base_config),
        "resources": to_dict(resources), "dtype": dtype, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    logger.info("run %s: %d rows in %d tasks -> %s", run_id, len(rows), len(tasks), output)

    lifecycle.init_ray(address)
    import ray.data

    dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        GenerateActor, fn_constructor_kwargs={
            "base": base, "checkpoints_root": root, "output": output, "batch_size": batch_size,
            "torch_threads": resources.threads, "use_gpu": resources.gpus_per_actor > 0, "dtype": dtype},
        **resources.map_batches_args())
    index: list[dict] = []
    try:
        index.extend(dict(row) for row in dataset.iter_rows())
    except Exception as exc:  # noqa: BLE001 - the images made are kept; the rest become failed rows
        logger.error("run %s: the job failed after %d images: %s", run_id, len(index), error_text(exc))
        index += unfinished_rows(rows, index, f"the job failed before this image was made ({error_text(exc, 1000)})")
    index.sort(key=lambda r: (r["row"], r["k"]))
    index_uri = write_parquet(storage.join(run, "index.parquet"), index, INDEX_SCHEMA)
    result = GenerateJobResult(run_id, index_uri, index, time.perf_counter() - start)
    logger.info("run %s done in %.1fs: %d images, %d failed; index %s", run_id, result.seconds,
                len(index) - result.failed, result.failed, index_uri)
    return result
