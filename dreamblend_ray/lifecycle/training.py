"""One service training: the body of the Ray task the scheduler starts for a queued subject.

It runs ``training.finetune_subject`` (the code the bulk job runs) on the subject's stored images,
resumable: a retried task (its worker died) continues after the last checkpoint. Progress goes to
``progress.json`` (step, total, checkpoints, the worker's pid and attempt) about once a second, and
the task stops within one optimizer step of its record asking for cancellation or deletion.
"""

from __future__ import annotations

import logging
import os
import time

from dreamblend_ray.config import FinetuneConfig, from_dict
from dreamblend_ray.io import storage
from dreamblend_ray.lifecycle import records
from dreamblend_ray.observability import context

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
CANCEL_CHECK_EVERY_S = 1.0


class TrainingStopped(RuntimeError):
    """The subject was canceled or deleted while it trained."""


class ProgressReporter:
    """The step callback: writes progress.json now and then, and stops a canceled run."""

    def __init__(self, root: str, subject_id: str, config: FinetuneConfig, attempt: int, clock=time.monotonic):
        self.root, self.subject_id, self.clock = root, subject_id, clock
        self.total, self.schedule, self.attempt = config.steps, config.schedule(), attempt
        self.last_write = self.last_check = float("-inf")

    def __call__(self, step: int, loss: float) -> None:
        now = self.clock()
        if step == self.total or step in self.schedule or now - self.last_write >= PROGRESS_EVERY_S:
            self.write(step, loss)
            self.last_write = now
        if now - self.last_check >= CANCEL_CHECK_EVERY_S:
            self.last_check = now
            self.check_stop()

    def write(self, step: int, loss: float | None) -> None:
        records.write_progress(self.root, self.subject_id, {
            "step": step, "total": self.total, "checkpoints": [s for s in self.schedule if s <= step],
            "loss": loss, "attempt": self.attempt, "worker_pid": os.getpid(), "updated_at": records.now_iso()})

    def check_stop(self) -> None:
        record = records.read_state(self.root, self.subject_id)
        if record is None or record.get("cancel_requested") or record.get("deleting"):
            raise TrainingStopped(f"subject {self.subject_id!r} was canceled or deleted")


def run_training(root: str, subject_id: str, base: str, torch_threads: int = 1) -> dict:
    """Fine-tune a queued subject from its stored images; its manifest (``subject.json``) last."""
    token = context.training_kind.set("service")  # this task's metrics are the service's (observability.catalog)
    try:
        return _train(root, subject_id, base, torch_threads)
    finally:
        context.training_kind.reset(token)  # the worker may run other tasks next


def _train(root: str, subject_id: str, base: str, torch_threads: int) -> dict:
    import torch

    from dreamblend_ray.training.finetune import finetune_subject

    torch.set_num_threads(torch_threads)
    record = records.read_state(root, subject_id)
    if record is None or record.get("deleting"):
        raise TrainingStopped(f"subject {subject_id!r} is gone")
    config = from_dict(FinetuneConfig, record["finetune"])
    previous = records.read_progress(root, subject_id) or {}
    attempt = int(previous.get("attempt") or 0) + 1  # a retried task sees its predecessor's
    reporter = ProgressReporter(root, subject_id, config, attempt)
    reporter.write(int(previous.get("step") or 0), previous.get("loss"))  # the attempt, before any step
    folder = records.images_uri(root, subject_id)
    images = [storage.join(folder, name) for name in record["images"]]
    logger.info("subject %s: training attempt %d on %s (%d images, %d steps)", subject_id, attempt, base,
                len(images), config.steps)
    manifest = finetune_subject(base, images, record["class_noun"], subject_id, root, config, progress=False,
                                callback=reporter, resumable=True)
    reporter.write(config.steps, manifest["loss_curve"][-1] if manifest["loss_curve"] else None)
    return {"steps": manifest["steps"], "guidance_step": manifest["guidance_step"],
            "edit_step": manifest["edit_step"], "train_s": manifest["timings"].get("train_s")}
