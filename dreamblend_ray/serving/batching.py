"""The model replica's batching: jobs -> sampler calls -> per-job results (no Ray, no HTTP).

A ``GenerationJob`` is what the ingress sends to the model deployment: one prompt and one seed per
image and the request's ``SamplingConfig``, validated once at the ingress and passed on as is (Ray
pickles it to the replica). Jobs share one sampler call only when they have the same model id and
an equal ``SamplingConfig`` (frozen, so hashable: it is the group key itself). A missing negative
prompt is "" for the sampler. The sampler is batch invariant, so every request gets exactly the
images it would get served alone.

The Serve deployment (``serving/app.py``) keeps the pending jobs in arrival order and runs
``take_group`` / ``run_group`` with its model lock held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def run_group(sampler, pair, jobs: list[GenerationJob], callback=None) -> list[tuple[list[bytes], list[float], float]]:
    """One sampler call for jobs of one group; returns (pngs, distances, seconds) per job.

    Blocking: call it in a worker thread, holding the replica's model lock.
    """
    prompts = [p for job in jobs for p in job.prompts]
    seeds = [s for job in jobs for s in job.seeds]
    negatives = None  # the sampler reads None as "" for every sample (diffusers' convention)
    if any(job.negative_prompts is not None for job in jobs):
        negatives = [n for job in jobs for n in (job.negative_prompts or [""] * len(job.prompts))]
    result = sampler.sample(pair, prompts, seeds, jobs[0].config, negative_prompts=negatives, callback=callback)
    distances = _mean_distances(result.attention_distance, len(prompts))
    out, start = [], 0
    for job in jobs:
        stop = start + len(job.prompts)
        out.append(([encode_png(img) for img in result.images[start:stop]], distances[start:stop],
                    float(result.seconds)))
        start = stop
    return out


def _mean_distances(distance, count: int) -> list[float]:
    """Per-sample mean of the (B, K) attention distance; NaN-free, empty K gives 0."""
    try:
        if distance is None or distance.numel() == 0:
            return [0.0] * count
        return [float(v) for v in distance.float().reshape(count, -1).mean(dim=1)]
    except (AttributeError, RuntimeError):
        return [0.0] * count
