"""What the Ray Data jobs share: resources, run ids, Ray start-up and the Parquet outputs.

The job modules (``finetune_job``, ``generate_job``) hold the logic, ``jobs/cli.py`` their command
lines; ``jobs/*.py`` are thin entry points for ``ray job submit``. The flags every job and command
shares (``--base``, ``--address``, the actor-pool sizes) are declared once in ``jobs/flags.py``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from dreamblend_ray.io import storage
from dreamblend_ray.config import check_range
from dreamblend_ray.jobs.flags import RESOURCE_DEFAULTS

logger = logging.getLogger(__name__)

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# Non-secret storage settings handed to the job's actors (credentials come from the cluster's
# own chain: instance roles, IRSA, or the job's runtime_env set by `dreamblend submit`).
PASSTHROUGH_VARIABLES = storage.ENDPOINT_VARIABLES + ("AWS_REGION", "AWS_DEFAULT_REGION",
                                                      "DREAMBLEND_STORAGE_RETRY_SECONDS")


# Retries of a task whose actor died; the subject is then a failed row (see finetune_job).
TASK_RETRIES = 2


@dataclass(frozen=True)
class JobResources:
    """How a job's actor pool is sized.

    num_actors: actors in the pool (each holds one copy of the base model).
    cpus_per_actor / gpus_per_actor: Ray resources reserved per actor; 0 GPUs runs on CPU.
    torch_threads: intra-op threads per actor (None: the actor's CPU count, at least 1).
    """

    num_actors: int = RESOURCE_DEFAULTS["num_actors"]
    cpus_per_actor: float = RESOURCE_DEFAULTS["cpus_per_actor"]
    gpus_per_actor: float = RESOURCE_DEFAULTS["gpus_per_actor"]
    torch_threads: int | None = RESOURCE_DEFAULTS["torch_threads"]

    def __post_init__(self):
        check_range("num_actors", self.num_actors, 1, 10_000, integer=True)
        check_range("cpus_per_actor", self.cpus_per_actor, 0.0, 1024.0)
        check_range("gpus_per_actor", self.gpus_per_actor, 0.0, 64.0)
        if self.torch_threads is not None:
            check_range("torch_threads", self.torch_threads, 1, 1024, integer=True)

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_actor))

    def map_batches_args(self) -> dict:
        """Arguments for ``Dataset.map_batches``: a fixed actor pool, one task at a time per actor
        (so a slow subject never queues others behind it), one row per call.

        An actor that dies (SIGKILL, out of memory, a lost node) is restarted and its task retried,
        but at most ``TASK_RETRIES`` times: Ray Data's default is to retry forever, so one subject
        that kills its actor every time would keep the job from ever ending."""
        import ray.data

        args = {"compute": ray.data.ActorPoolStrategy(size=self.num_actors, max_tasks_in_flight_per_actor=1),
                "batch_size": 1, "batch_format": "pyarrow", "num_cpus": self.cpus_per_actor,
                "max_restarts": -1, "max_task_retries": TASK_RETRIES}
        if self.gpus_per_actor:
            args["num_gpus"] = self.gpus_per_actor
        env = storage_env()
        if env:
            args["runtime_env"] = {"env_vars": env}
        return args


def storage_env() -> dict[str, str]:
    """The storage endpoint/region variables of this process, for the job's actors."""
    return {name: os.environ[name] for name in PASSTHROUGH_VARIABLES if os.environ.get(name)}


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id) or run_id in (".", ".."):
        raise ValueError(f"run_id must match [A-Za-z0-9_.-] and be 1 to 128 characters, got {run_id!r}")
    return run_id


def run_uri(output: str, run_id: str) -> str:
    return storage.join(output, "runs", validate_run_id(run_id))


def check_base(base: str) -> str:
    """``base`` resolved (``components.resolve_base``) and checked from the driver, before any actor
    starts: a local folder or a remote prefix (s3://, gs://, ...) must hold model_index.json.
    ValueError otherwise."""
    from dreamblend_ray.models.components import embedded_model_dir, resolve_base

    base = resolve_base(base)
    index = (storage.join(base, "model_index.json") if storage.is_remote(base)
             else str(embedded_model_dir() / "model_index.json") if base == "embedded" else None)
    if index is not None and not storage.exists(index):
        raise ValueError(f"base model {base!r} has no model_index.json (expected a diffusers "
                         "StableDiffusionPipeline folder)")
    return base


def write_parquet(uri: str, rows: list[dict], schema: pa.Schema) -> str:
    """Write ``rows`` as one Parquet file (atomic, retried) and return ``uri``."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def read_parquet(uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def error_text(exc: BaseException, limit: int = 2000) -> str:
    """A one-line ``Type: message`` for a results table."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
