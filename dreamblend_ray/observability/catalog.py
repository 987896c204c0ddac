"""Every metric the service exports: its name, kind, unit, labels and meaning, in one table.

The code records them through :mod:`dreamblend_ray.observability.metrics` (``ray.util.metrics``), the
Grafana dashboard and the alert rules in ``k8s/monitoring/`` query them, and ``docs/operations.md``
lists them; tests check all three against this table, so a renamed metric cannot leave a panel
querying nothing.

Names here are the ones the code registers (``dreamblend_*``). Ray's Prometheus export prefixes
``ray_`` and, for counters, appends ``_total`` (histograms get ``_bucket``, ``_count`` and ``_sum``):
:attr:`MetricSpec.exported` is the name a query uses. Ray's histograms report their ``_sum`` from
bucket midpoints, so a mean from ``_sum / _count`` is approximate; the counts are exact.

Labels are bounded by construction: a route is the API's path template (``/v1/subjects/{subject_id}``,
never the id), a status a code, a tenant one of the keys file's tenants (``default`` without tenants,
``anonymous`` before authentication), a reason one of :data:`REJECT_REASONS` or
:data:`TRAINING_FAILURES`. No subject id, prompt, key or request id is ever a label value.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("counter", "gauge", "histogram")
GROUPS = ("ingress", "replica", "training", "webhooks", "storage")
PREFIX = "dreamblend_"
RAY_PREFIX = "ray_"

# label values
BATCHINGS = ("continuous", "static")
REJECT_REASONS = ("quota", "unauthorized_throttle", "overloaded", "replica_unavailable", "storage_unavailable",
                  "body_too_large")
TRAINING_KINDS = ("job", "service")
TRAINING_STATES = ("queued", "training", "ready", "failed", "canceled")  # the subject records' states
TRAINING_FAILURES = ("bad_input", "storage", "out_of_memory", "worker_died", "error")
WEBHOOK_OUTCOMES = ("delivered", "retried", "dead")
STEP_PARTS = ("plain", "guidance")
CACHE_RESULTS = ("hit", "miss")

SECONDS_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SECONDS_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SECONDS_LONG = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
SECONDS_IO = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: ``name`` as registered, its ``kind``, ``unit``, ``labels`` and ``description``."""

    name: str
    kind: str
    group: str
    unit: str
    labels: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.name.startswith(PREFIX):
            raise ValueError(f"metric names start with {PREFIX!r}: {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")
        if (self.kind == "histogram") != bool(self.boundaries):
            raise ValueError(f"{self.name}: histograms, and only they, have boundaries")
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"{self.name}: boundaries must increase")

    @property
    def exported(self) -> str:
        """The name on Ray's Prometheus export (a histogram's series add ``_bucket``/``_count``/``_sum``)."""
        return RAY_PREFIX + self.name + ("_total" if self.kind == "counter" else "")

    def series(self) -> tuple[str, ...]:
        """Every series name this metric exports."""
        if self.kind == "histogram":
            return tuple(self.exported + suffix for suffix in ("_bucket", "_count", "_sum"))
        return (self.exported,)


def _spec(name, kind, group, unit, labels, description, boundaries=()) -> MetricSpec:
    return MetricSpec(PREFIX + name, kind, group, unit, tuple(labels), description, tuple(boundaries))


CATALOG: tuple[MetricSpec, ...] = (
    # ---------------------------------------------------------------- ingress (the HTTP edge)
    _spec("http_requests", "counter", "ingress", "requests", ("route", "method", "status", "tenant"),
          "HTTP requests answered, by route template, method, status code and tenant."),
    _spec("http_request_seconds", "histogram", "ingress", "seconds", ("route", "method", "status"),
          "Time from the request reaching the ingress to its response, by route and status.", SECONDS_LATENCY),
    _spec("http_request_bytes", "counter", "ingress", "bytes", ("route", "tenant"),
          "Request body bytes received, by route and tenant."),
    _spec("http_response_bytes", "counter", "ingress", "bytes", ("route", "tenant"),
          "Response body bytes sent, by route and tenant."),
    _spec("http_rejections", "counter", "ingress", "requests", ("status", "reason", "tenant"),
          "Requests refused for capacity: 429s (a tenant's quota, the 401 throttle), 503s (overloaded, "
          "replica unavailable, storage unavailable) and 413s (body too large), by reason."),
    # ---------------------------------------------------------------- model replica
    _spec("queue_depth", "gauge", "replica", "jobs", ("family", "batching"),
          "Jobs on a replica waiting to start sampling (continuous: not yet admitted; static: waiting "
          "for the model lock)."),
    _spec("active_rows", "gauge", "replica", "rows", ("family", "batching"),
          "Images being denoised on a replica right now."),
    _spec("rows_per_unet_call", "histogram", "replica", "rows", ("family", "batching"),
          "Images sharing one denoising step (one batched UNet call per pass).", ROWS),
    _spec("step_seconds", "histogram", "replica", "seconds", ("family", "batching"),
          "Wall time of one denoising step of the whole batch (every pass of that step).", SECONDS_STEP),
    _spec("denoise_seconds", "counter", "replica", "seconds", ("family", "batching", "part"),
          "Denoising time split into the plain sampling part (E's pass) and the guidance part (G's "
          "passes and the steering gradient): rate(guidance) / rate(all) is DreamBlend's live cost "
          "over plain sampling."),
    _spec("guided_share", "gauge", "replica", "ratio", ("family", "batching"),
          "The guidance part's share of denoising time over the replica's last steps (0..1)."),
    _spec("adapters_loaded", "gauge", "replica", "pairs", ("family",),
          "Subjects' checkpoint pairs loaded on a replica."),
    _spec("adapter_loads", "counter", "replica", "loads", ("family",),
          "Checkpoint pairs loaded onto a replica (cache misses that completed)."),
    _spec("adapter_evictions", "counter", "replica", "evictions", ("family",),
          "Checkpoint pairs evicted from a replica (LRU or subject deleted)."),
    _spec("adapter_cache", "counter", "replica", "lookups", ("family", "result"),
          "Pair lookups on a replica: hit (already loaded) or miss (loaded for this request)."),
    _spec("images_generated", "counter", "replica", "images", ("family", "batching", "tenant"),
          "Images returned by a replica."),
    _spec("time_to_first_step_seconds", "histogram", "replica", "seconds", ("family", "batching"),
          "Time from a job reaching the replica to its first denoising step.", SECONDS_LATENCY),
    _spec("pair_load_seconds", "histogram", "storage", "seconds", ("family",),
          "Reading and attaching a subject's checkpoint pair on a replica.", SECONDS_IO),
    # ---------------------------------------------------------------- training
    _spec("trainings", "counter", "training", "trainings", ("kind", "state", "tenant"),
          "Trainings that entered a state (queued, training, ready, failed, canceled), by kind: "
          "`job` (Ray Data fine-tune jobs) or `service` (the subject service's trainings)."),
    _spec("trainings_active", "gauge", "training", "trainings", ("kind", "state"),
          "Trainings queued or training right now (the subject scheduler's view)."),
    _spec("training_steps", "counter", "training", "steps", ("kind", "family"),
          "Optimizer steps taken: rate() is steps per second."),
    _spec("training_seconds", "histogram", "training", "seconds", ("kind", "family"),
          "Time to ready: from a training's start to its checkpoint pair being published.", SECONDS_LONG),
    _spec("training_failures", "counter", "training", "trainings", ("kind", "reason"),
          "Trainings that failed, by reason."),
    _spec("checkpoint_upload_seconds", "histogram", "storage", "seconds", ("kind",),
          "Writing one checkpoint (weights and manifest) to storage.", SECONDS_IO),
    # ---------------------------------------------------------------- webhooks
    _spec("webhook_deliveries", "counter", "webhooks", "deliveries", ("outcome",),
          "Webhook delivery attempts by outcome: delivered (a 2xx), retried (failed or refused; tried "
          "again later), dead (gave up after the last try; kept in the outbox's dead letters)."),
    _spec("webhook_backlog", "gauge", "webhooks", "events", (),
          "Webhook events waiting for delivery or a retry (after each delivery pass)."),
)

BY_NAME = {spec.name: spec for spec in CATALOG}


def spec(name: str) -> MetricSpec:
    """The catalog entry of ``name`` (with or without the ``dreamblend_`` prefix); KeyError otherwise."""
    return BY_NAME[name if name.startswith(PREFIX) else PREFIX + name]


def exported_series() -> set[str]:
    """Every series name the service exports (what a PromQL query may name)."""
    return {series for entry in CATALOG for series in entry.series()}
