"""A fake model backend and subject store for the HTTP layer, and a loopback uvicorn server.

Used by test_serving.py (in-process TestClient), test_openapi.py (Schemathesis over HTTP) and
test_docs_offline.py (a headless browser): no Ray, no model.
"""

import base64
import contextlib
import socket
import tempfile
import threading
import time

from PIL import Image

from dreamblend_ray.io.images import encode_png
from dreamblend_ray.lifecycle.scheduler import SubjectScheduler
from dreamblend_ray.serving import http
from dreamblend_ray.serving.batching import GenerationJob, GenerationResult
from dreamblend_ray.serving.requests import AppArgs

MANIFEST = {"version": 1, "subject_id": "dog", "class_noun": "dog", "token": "sks", "instance_prompt": "a sks dog",
            "base": {"source": "/secret/models/tiny-sd", "config_sha256": "ab" * 32}, "kind": "lora",
            "steps": [2, 4, 6], "guidance_step": 2, "edit_step": 6, "loss_curve": [0.5, 0.4],
            "config": {"steps": 6}, "timings": {"train_seconds": 1.0},
            "library_versions": {"torch": "2.13.0"}, "device": "cpu", "created_at": "2026-12-02T00:00:00Z"}


# The store's complete subjects (sorted): only "dog" has an attention-probe plot; "cat" is absent.
SUBJECT_IDS = ("bird", "dog", "eel", "fox", "owl")
MAP_SIZE = (4, 4)


def png(color=(255, 0, 0)) -> bytes:
    return encode_png(Image.new("RGB", (8, 8), color))


def attention_entry(prompt: str) -> dict:
    """What run_group gives per image with attention_maps: one W x h x w map per row, W = its words."""
    words = prompt.split() or [prompt]
    grid = [[[round((w + 1) / (len(words) + 1), 5)] * MAP_SIZE[1] for _ in range(MAP_SIZE[0])]
            for w in range(len(words))]
    image = base64.b64encode(png((0, 0, 255))).decode("ascii")
    return {"words": words, "rows": ["guidance", "edit", "dreamblend"], "map_size": list(MAP_SIZE),
            "maps": {"guidance": grid, "edit": grid, "dreamblend": grid},
            "images": {"guidance": image, "edit": image}, "attention_distance_steps": [0.5, 0.25]}


class RecordingBackend:
    """Answers every job with 8x8 PNGs (or raises ``error``); records the jobs it got."""

    def __init__(self, error: Exception | None = None):
        self.jobs: list[GenerationJob] = []
        self.error = error

    async def generate(self, job):
        self.jobs.append(job)
        if self.error is not None:
            raise self.error
        attention = [attention_entry(p) for p in job.prompts] if job.config.attention_maps else None
        return GenerationResult(pngs=[png() for _ in job.prompts], seeds=job.seeds, batch_requests=1,
                                batch_images=len(job.prompts), replica="r1", loaded_models=[job.model_id],
                                attention_distance=[0.5] * len(job.prompts), attention=attention)

    async def model_health(self):
        return {"replica": "r1", "loaded_models": ["dog"]}

    async def model_status(self):
        return {"replica": "r1", "family": "sd1", "batching": "continuous", "queue_depth": 2, "active_rows": 3,
                "rows_per_step": 2.5, "max_rows_per_step": 4, "recent_steps": 10, "step_ms": 12.5,
                "guided_share": 0.4, "last_step_at": 1.0, "loaded_models": ["dog", "acme~cat@g2,e4"]}


def read_manifest(subject_id, tenant="default"):
    """The store: the SUBJECT_IDS exist ("dog" is MANIFEST, the others the same under their id)."""
    if subject_id not in SUBJECT_IDS or tenant != "default":  # the other tenants' stores are empty
        raise FileNotFoundError(subject_id)
    return MANIFEST if subject_id == "dog" else {**MANIFEST, "subject_id": subject_id}


def list_subjects(after, limit, tenant="default"):
    """``layout.list_subject_ids`` over the store: sorted ids after the cursor, at most ``limit``."""
    return [s for s in SUBJECT_IDS if (after is None or s > after) and tenant == "default"][:limit]


def read_collapse_plot(subject_id, tenant="default"):
    """Only "dog" has an attention-probe plot."""
    if subject_id != "dog" or tenant != "default":
        raise FileNotFoundError(subject_id)
    return png((0, 255, 0))


@contextlib.contextmanager
def serve_on_loopback(app):
    """Run ``app`` under uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class InProcessScheduler(SubjectScheduler):
    """The real subject scheduler without Ray: creates, cancels, deletes and jobs are recorded in
    the (temporary) store; trainings and jobs are admitted but never run."""

    def _launch_training(self, subject_id):
        return None

    async def _reap_trainings(self):
        return None

    def _admit_jobs(self):
        return None

    async def start(self):
        return True


def make_app(backend=None, **overrides):
    """The fake store's app; the subject service runs in process on a temporary storage root."""
    values = {"base": "tiny", "storage_root": tempfile.mkdtemp(prefix="dreamblend-api-"), **overrides}
    args = AppArgs(**values)
    service = InProcessScheduler({"storage_root": args.storage_root, "max_concurrent_trainings": 1})
    return http.make_api(args, backend or RecordingBackend(), read_manifest, list_subjects, read_collapse_plot,
                         subject_service=service)
