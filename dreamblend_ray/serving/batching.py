"""The model replica's batching: jobs -> sampler calls -> per-job results (no Ray, no HTTP).

A ``GenerationJob`` is what the ingress sends to the model deployment: one prompt and one seed per
image and the request's ``SamplingConfig``, validated once at the ingress and passed on as is (Ray
pickles it to the replica). Jobs share one sampler call only when they have the same model id and
an equal ``SamplingConfig`` (frozen, so hashable: it is the group key itself). A missing negative
prompt is "" for the sampler. The sampler is batch invariant, so every request gets exactly the
images it would get served alone.

With ``config.attention_maps`` the same sampler call also gives each image's per-word heat maps
(``method/heatmap_report.py``): ``GenerationResult.attention`` holds one JSON-ready dict per image
(``ATTENTION_KEYS``), G's and unguided E's images in it as base64 PNGs (DreamBlend's image is the
job's own). Such jobs only batch with each other, since the config is the group key.

The Serve deployment (``serving/app.py``) keeps the pending jobs in arrival order and runs
``take_group`` / ``run_group`` with its model lock held.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.io.images import encode_png


@dataclass
class GenerationJob:
    """What the ingress sends to the model deployment: one prompt and seed per image."""

    model_id: str
    prompts: list[str]
    seeds: list[int]
    config: SamplingConfig
    negative_prompts: list[str] | None = None
    deadline: float = float("inf")  # time.time() after which the result is no longer wanted
    request_id: str | None = None  # the HTTP request's id (observability.context), for the replica's lines
    received_at: float | None = None  # the replica's perf_counter when the job reached it

    @property
    def group_key(self) -> tuple[str, SamplingConfig]:
        """Jobs with equal keys can share one sampler call."""
        return (self.model_id, self.config)


@dataclass
class GenerationResult:
    """What the model deployment returns for one job."""

    pngs: list[bytes]
    seeds: list[int]
    batch_requests: int  # requests that shared the sampler call
    batch_images: int  # images in that call
    replica: str
    loaded_models: list[str] = field(default_factory=list)
    sample_seconds: float = 0.0
    attention_distance: list[float] = field(default_factory=list)  # mean over guided steps, per image
    attention: list[dict] | None = None  # with config.attention_maps: one ATTENTION_KEYS dict per image


# One image's attention entry: AttentionReport.to_json() without prompt and seed, plus G's and
# unguided E's images ({"guidance", "edit"} -> base64 PNG).
ATTENTION_KEYS = ("words", "rows", "map_size", "maps", "images", "attention_distance_steps")


class JobOutput(NamedTuple):
    """One job's share of a sampler call."""

    pngs: list[bytes]
    distances: list[float]
    seconds: float
    attention: list[dict] | None = None


def group_jobs(jobs: list[GenerationJob]) -> list[list[int]]:
    """Indices of jobs that can share one sampler call, in arrival order."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.group_key, []).append(index)
    return list(groups.values())


def take_group(pending: list[GenerationJob], max_requests: int) -> list[int]:
    """Indices of the oldest pending job and the later ones of its group, at most ``max_requests``."""
    if not pending:
        return []
    key = pending[0].group_key
    return [i for i, job in enumerate(pending) if job.group_key == key][:max_requests]


def run_group(sampler, pair, jobs: list[GenerationJob], callback=None, step_lock=None) -> list[JobOutput]:
    """One sampler call for jobs of one group; one ``JobOutput`` per job.

    Blocking: call it in a worker thread, holding the replica's model lock; ``step_lock`` (the
    UNet lock) is taken for each denoising step (``DreamBlendSampler.sample``).
    """
    prompts = [p for job in jobs for p in job.prompts]
    seeds = [s for job in jobs for s in job.seeds]
    negatives = None  # the sampler reads None as "" for every sample (diffusers' convention)
    if any(job.negative_prompts is not None for job in jobs):
        negatives = [n for job in jobs for n in (job.negative_prompts or [""] * len(job.prompts))]
    config = jobs[0].config
    extra = {"track_distance": True} if config.attention_maps else {}  # the report's distance curve
    result = sampler.sample(pair, prompts, seeds, config, negative_prompts=negatives, callback=callback,
                            step_lock=step_lock, **extra)
    distances = _mean_distances(result.attention_distance, len(prompts))
    attention = None
    if config.attention_maps:
        components = sampler.components
        attention = attention_entries(result, prompts, seeds, *components.model_family.map_tokens(components))
    out, start = [], 0
    for job in jobs:
        stop = start + len(job.prompts)
        out.append(JobOutput([encode_png(img) for img in result.images[start:stop]], distances[start:stop],
                             float(result.seconds), None if attention is None else attention[start:stop]))
        start = stop
    return out


def attention_entries(result, prompts: list[str], seeds: list[int], tokenizer, offset: int = 0) -> list[dict]:
    """One JSON-ready ``ATTENTION_KEYS`` dict per sample of a SampleResult made with attention_maps
    (``tokenizer``, ``offset``: the base family's ``map_tokens``)."""
    # Deferred: heat maps need torch, which the ingress (it imports this module) never loads for them.
    from dreamblend_ray.method.heatmap_report import reports_from

    entries = []
    for report in reports_from(result, prompts, seeds, tokenizer, offset):
        entry = {key: value for key, value in report.to_json().items() if key not in ("prompt", "seed")}
        entry["attention_distance_steps"] = [d if math.isfinite(d) else None
                                             for d in entry["attention_distance_steps"]]
        entry["images"] = {row: base64.b64encode(encode_png(report.images[row])).decode("ascii")
                           for row in ("guidance", "edit")}
        entries.append(entry)
    return entries


def _mean_distances(distance, count: int) -> list[float]:
    """Per-sample mean of the (B, K) attention distance; NaN-free, empty K gives 0."""
    try:
        if distance is None or distance.numel() == 0:
            return [0.0] * count
        return [float(v) for v in distance.float().reshape(count, -1).mean(dim=1)]
    except (AttributeError, RuntimeError):
        return [0.0] * count
