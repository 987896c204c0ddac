"""The subject service's settings: one frozen, validated dataclass, built from the app's arguments."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

from dreamblend_ray.config import check_range


@dataclass(frozen=True)
class ServiceSettings:
    """What the scheduler needs: where subjects live, how trainings run, webhooks and retention.

    Trainings run as Ray tasks with ``training_num_cpus`` / ``training_num_gpus`` and the custom
    ``training_resources`` (e.g. ``{"training": 1}`` to keep them on a KubeRay worker group of
    their own), never on the ingress or the model replicas. A worker that dies is retried up to
    ``training_max_retries`` times, resuming from its last checkpoint.
    """

    storage_root: str
    base: str = "embedded"
    max_concurrent_trainings: int = 2
    training_num_cpus: float = 1.0
    training_num_gpus: float = 0.0
    training_resources: dict = field(default_factory=dict)
    training_max_retries: int = 2
    training_torch_threads: int = 1
    job_num_cpus: float = 1.0
    job_num_gpus: float = 0.0
    retention_days: int | None = None
    retention_sweep_s: float = 3600.0
    webhook_secret_env: str = "DREAMBLEND_WEBHOOK_SECRET"
    webhook_secret_file: str | None = None
    webhook_allow_hosts: tuple[str, ...] = ()
    webhook_allow_private: bool = False
    webhook_allow_loopback: bool = False
    webhook_max_attempts: int = 8
    webhook_base_delay_s: float = 1.0
    tick_s: float = 0.5

    def __post_init__(self):
        if not isinstance(self.storage_root, str) or not self.storage_root:
            raise ValueError("storage_root must be a non-empty path or URI")
        check_range("max_concurrent_trainings", self.max_concurrent_trainings, 1, 10_000, integer=True)
        check_range("training_max_retries", self.training_max_retries, 0, 100, integer=True)
        check_range("training_torch_threads", self.training_torch_threads, 1, 1024, integer=True)
        check_range("webhook_max_attempts", self.webhook_max_attempts, 1, 100, integer=True)
        for name in ("training_num_cpus", "training_num_gpus", "job_num_cpus", "job_num_gpus"):
            check_range(name, getattr(self, name), 0.0, 1024.0)
        check_range("webhook_base_delay_s", self.webhook_base_delay_s, 0.0, 3600.0)
        check_range("retention_sweep_s", self.retention_sweep_s, 1.0, 7 * 86400.0)
        check_range("tick_s", self.tick_s, 0.01, 60.0)
        if self.retention_days is not None:
            check_range("retention_days", self.retention_days, 1, 36500, integer=True)
        object.__setattr__(self, "webhook_allow_hosts", tuple(h.lower() for h in self.webhook_allow_hosts))

    @classmethod
    def from_args(cls, args: dict) -> "ServiceSettings":
        """The settings among an app's arguments (a dict with more keys is fine)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in args.items() if k in names and v is not None}
        if "webhook_allow_hosts" in values:
            values["webhook_allow_hosts"] = tuple(values["webhook_allow_hosts"])
        return cls(**values)

    @property
    def actor_name(self) -> str:
        """One scheduler per storage root (two apps on two roots never share one)."""
        return "dreamblend-subjects-" + hashlib.sha256(self.storage_root.encode()).hexdigest()[:12]
