"""Recording the catalog's metrics: ``metrics.get("http_requests").inc(route=..., ...)``.

Each metric is a ``ray.util.metrics`` object, created on first use in a process that runs Ray (a
Serve replica, an actor, a task, a driver), so it appears on every node's Prometheus export. Outside
Ray (unit tests, a library caller) recording still works: every metric keeps a process-local copy of
its values (:meth:`Metric.value`, :meth:`Metric.count`), which the replica's status view and the tests
read. :func:`set_enabled` (False) turns recording into a no-op, which ``bench_serve.py --suite metrics``
uses to measure what the metrics cost.

Label values are checked against the catalog's label names (a missing or extra label is a
ValueError: a typo must not export a new series) and turned into strings.
"""

from __future__ import annotations

import logging
import threading

from dreamblend_ray.observability.catalog import BY_NAME, PREFIX, MetricSpec

logger = logging.getLogger(__name__)

_enabled = True
_metrics: dict[str, "Metric"] = {}
_lock = threading.Lock()


def set_enabled(flag: bool) -> None:
    """Turn recording on or off for this process."""
    global _enabled
    _enabled = bool(flag)


GAUGE_REFRESH_S = 1.0
_refresher: threading.Thread | None = None


def keep_gauges_fresh(interval_s: float = GAUGE_REFRESH_S) -> None:
    """Re-send every gauge's last values to Ray every ``interval_s`` (idempotent, a daemon thread).

    Ray exports a gauge series only while its process keeps recording it (a value not refreshed
    for two report intervals is dropped from the export), so a queue depth set once would vanish
    while it is still true. Processes with gauges (model replicas, the scheduler) start this."""
    global _refresher
    with _lock:
        if _refresher is not None and _refresher.is_alive():
            return
        _refresher = threading.Thread(target=_refresh_forever, args=(interval_s,), name="dreamblend-gauges",
                                      daemon=True)
        _refresher.start()


def _refresh_forever(interval_s: float) -> None:
    import time

    while True:
        time.sleep(interval_s)
        refresh_gauges()


def refresh_gauges() -> None:
    """Send every gauge's local values to Ray once more."""
    for metric in list(_metrics.values()):
        if metric.spec.kind == "gauge" and _enabled:
            metric.resend()


def get(name: str) -> "Metric":
    """The process's recorder of the catalog metric ``name`` (with or without ``dreamblend_``)."""
    key = name if name.startswith(PREFIX) else PREFIX + name
    metric = _metrics.get(key)
    if metric is None:
        with _lock:
            metric = _metrics.setdefault(key, Metric(BY_NAME[key]))
    return metric


class Metric:
    """One catalog metric in this process: Ray's object (when Ray runs) and a local copy."""

    def __init__(self, spec: MetricSpec):
        self.spec = spec
        self._ray = None
        self._ray_checked = False
        self._lock = threading.Lock()
        self._values: dict[tuple, float] = {}
        self._counts: dict[tuple, int] = {}

    # ------------------------------------------------------------------ recording

    def inc(self, value: float = 1.0, **labels) -> None:
        self._record("counter", value, labels)

    def set(self, value: float, **labels) -> None:
        self._record("gauge", value, labels)

    def observe(self, value: float, **labels) -> None:
        self._record("histogram", value, labels)

    def _record(self, kind: str, value: float, labels: dict) -> None:
        if not _enabled:
            return
        if kind != self.spec.kind:
            raise ValueError(f"{self.spec.name} is a {self.spec.kind}, not a {kind}")
        if kind == "counter" and value < 0:
            raise ValueError(f"{self.spec.name} is a counter: it cannot go down by {value}")
        tags = self._tags(labels)
        key = tuple(sorted(tags.items()))
        value = float(value)
        with self._lock:
            if kind == "gauge":
                self._values[key] = value
            else:
                self._values[key] = self._values.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1
        impl = self._impl()
        if impl is None or (kind == "counter" and value == 0):  # Ray's counters take positive steps only
            return
        tags = tags or None
        try:
            if kind == "counter":
                impl.inc(value, tags=tags)
            elif kind == "gauge":
                impl.set(value, tags=tags)
            else:
                impl.observe(value, tags=tags)
        except Exception:  # noqa: BLE001 - a metric must never fail the work it measures
            self._warn_once()

    def resend(self) -> None:
        """A gauge's last values, to Ray again (see :func:`keep_gauges_fresh`)."""
        impl = self._impl()
        if impl is None:
            return
        with self._lock:
            items = list(self._values.items())
        try:
            for key, value in items:
                impl.set(value, tags=dict(key) or None)
        except Exception:  # noqa: BLE001 - a metric must never fail the work it measures
            self._warn_once()

    def _warn_once(self) -> None:
        if not getattr(self, "_warned", False):
            self._warned = True
            logger.exception("recording %s failed; it keeps only its local copy when it fails", self.spec.name)

    def _tags(self, labels: dict) -> dict[str, str]:
        if set(labels) != set(self.spec.labels):
            raise ValueError(f"{self.spec.name} takes the labels {self.spec.labels}, got {tuple(sorted(labels))}")
        return {name: "none" if value is None else str(value) for name, value in labels.items()}

    def _impl(self):
        if self._ray_checked:
            return self._ray
        import ray

        if not ray.is_initialized():
            return None  # checked again next time: Ray may start later in this process
        from ray.util import metrics as ray_metrics

        spec, keys = self.spec, self.spec.labels or None
        try:
            if spec.kind == "counter":
                self._ray = ray_metrics.Counter(spec.name, spec.description, tag_keys=keys)
            elif spec.kind == "gauge":
                self._ray = ray_metrics.Gauge(spec.name, spec.description, tag_keys=keys)
            else:
                self._ray = ray_metrics.Histogram(spec.name, spec.description, list(spec.boundaries), tag_keys=keys)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            logger.exception("metric %s could not be registered; recording it locally only", spec.name)
        self._ray_checked = True
        return self._ray

    # ------------------------------------------------------------------ the local copy

    def value(self, **labels) -> float:
        """The local total (counter), last value (gauge) or sum (histogram) of the series matching
        ``labels`` (a subset of the label names; summed over the others)."""
        return sum(v for key, v in self._matching(self._values, labels))

    def count(self, **labels) -> int:
        """How many values were recorded on the matching series (a histogram's observations)."""
        return sum(c for key, c in self._matching(self._counts, labels))

    def _matching(self, table: dict, labels: dict):
        wanted = {name: str(value) for name, value in labels.items()}
        with self._lock:
            items = list(table.items())
        return [(key, v) for key, v in items if all(dict(key).get(n) == val for n, val in wanted.items())]


def failure_reason(exc: BaseException) -> str:
    """A failed training's ``catalog.TRAINING_FAILURES`` label, from the exception's kind."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc)[:300].lower()
    if "OutOfMemoryError" in names or "out of memory" in text:
        return "out_of_memory"
    if names & {"WorkerCrashedError", "ActorDiedError"} or "worker died" in text:
        return "worker_died"
    if names & {"ValueError", "FileNotFoundError", "ManifestError"}:
        return "bad_input"
    if names & {"StorageError", "OSError"}:
        return "storage"
    return "error"
