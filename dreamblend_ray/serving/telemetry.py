"""A model replica's metrics: what its batch does, step by step (``dreamblend_*``, replica group).

:class:`ReplicaTelemetry` records the catalog's replica metrics (queue depth, active rows, rows per
UNet call, step time, the guidance part of it, adapters, images, time to first step) with the
replica's base family and the batching path as labels, and keeps a short window of recent steps for
the status view (``GET /v1/status``): a person sees the batch working without Prometheus.
"""

from __future__ import annotations

import collections
import threading
import time

from dreamblend_ray.observability import metrics

RECENT_STEPS = 64


class ReplicaTelemetry:
    """The replica's recorder; ``family`` is its base family (``sd1``, ``sdxl``, ``flux``, ...)."""

    def __init__(self, family: str):
        self.family = family
        self.steps: collections.deque = collections.deque(maxlen=RECENT_STEPS)  # (time, rows, seconds, guided_s)
        self.depth = {"continuous": 0, "static": 0}
        self.active = {"continuous": 0, "static": 0}
        self._lock = threading.Lock()

    def _labels(self, batching: str) -> dict:
        return {"family": self.family, "batching": batching}

    def queue(self, batching: str, depth: int) -> None:
        self.depth[batching] = depth
        metrics.get("queue_depth").set(depth, **self._labels(batching))

    def rows(self, batching: str, active: int) -> None:
        self.active[batching] = active
        metrics.get("active_rows").set(active, **self._labels(batching))

    def step(self, batching: str, calls: list[int], seconds: float, guidance_s: float | None = None) -> None:
        """One denoising step of the batch: images per UNet call, its time and (when known) the
        guidance part of that time."""
        labels = self._labels(batching)
        for rows in calls:
            metrics.get("rows_per_unet_call").observe(rows, **labels)
        metrics.get("step_seconds").observe(seconds, **labels)
        if guidance_s is not None:
            metrics.get("denoise_seconds").inc(guidance_s, part="guidance", **labels)
            metrics.get("denoise_seconds").inc(max(seconds - guidance_s, 0.0), part="plain", **labels)
        with self._lock:
            self.steps.append((time.time(), max(calls, default=0), seconds, guidance_s))
            share = self._guided_share()
        if share is not None and guidance_s is not None:
            metrics.get("guided_share").set(share, **labels)

    def _guided_share(self) -> float | None:
        measured = [(seconds, guided) for _, _, seconds, guided in self.steps if guided is not None]
        total = sum(seconds for seconds, _ in measured)
        return sum(guided for _, guided in measured) / total if total > 0 else None

    def first_step(self, batching: str, seconds: float) -> None:
        metrics.get("time_to_first_step_seconds").observe(seconds, **self._labels(batching))

    def images(self, batching: str, count: int, tenant: str) -> None:
        metrics.get("images_generated").inc(count, tenant=tenant, **self._labels(batching))

    def cache(self, hit: bool) -> None:
        metrics.get("adapter_cache").inc(family=self.family, result="hit" if hit else "miss")

    def loaded(self, seconds: float, pairs: int) -> None:
        metrics.get("adapter_loads").inc(family=self.family)
        metrics.get("pair_load_seconds").observe(seconds, family=self.family)
        metrics.get("adapters_loaded").set(pairs, family=self.family)

    def evicted(self, pairs: int) -> None:
        metrics.get("adapter_evictions").inc(family=self.family)
        metrics.get("adapters_loaded").set(pairs, family=self.family)

    def snapshot(self) -> dict:
        """The status view's numbers: queue depth, active rows, recent steps' rows and times."""
        with self._lock:
            recent = list(self.steps)
            share = self._guided_share()
        rows = [r for _, r, _, _ in recent]
        times = [s for _, _, s, _ in recent]
        return {"queue_depth": sum(self.depth.values()), "active_rows": sum(self.active.values()),
                "recent_steps": len(recent), "rows_per_step": round(sum(rows) / len(rows), 2) if rows else None,
                "max_rows_per_step": max(rows, default=None),
                "step_ms": round(1000 * sum(times) / len(times), 1) if times else None,
                "guided_share": None if share is None else round(share, 3),
                "last_step_at": recent[-1][0] if recent else None}
