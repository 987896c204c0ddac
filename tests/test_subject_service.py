"""The subject service end to end: Ray Serve over real HTTP, trainings as Ray tasks on the tiny base,
storage on moto's S3 server over the wire, and a real webhook receiver that verifies signatures.

One app for the module (auth on, webhooks signed with a secret from a file, loopback allowed for the
receiver). Subjects are small LoRA runs on 3 solid-ball images; each test makes its own subject.
"""

import io
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from dreamblend_ray.io import storage
from test_serve import pixels
from dreamblend_ray.lifecycle import webhooks

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow

KEY = "subject-service-key-0123456789abcdef"  # tenant "default": the store's root, as before tenants
KEY_B = "second-tenant-key-fedcba9876543210xyz"  # tenant "beta": {root}/tenants/beta
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FINETUNE = {"prior_preservation": False, "resolution": 32, "min_image_size": 32, "learning_rate": 5e-2,
            "steps": 6, "checkpoint_steps": [2, 4, 6]}


def ball_png(color, shift=0, size=64) -> bytes:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(image).ellipse((12 + shift, 12, 48 + shift, 48), fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def files(color=(255, 0, 0), count=3):
    return [("images", (f"ball{i}.png", ball_png(color, i), "image/png")) for i in range(count)]


class Receiver:
    """A webhook endpoint on loopback: verifies every delivery, records the events; can be down."""

    def __init__(self):
        self.events: list[dict] = []
        self.refused = 0
        self.up = threading.Event()
        self.up.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                if not outer.up.is_set():
                    outer.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                webhooks.verify(SECRET, dict(self.headers), body)  # raises (-> 500) if forged
                outer.events.append({**json.loads(body), "webhook-id": self.headers["webhook-id"]})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, subject_id: str) -> list[str]:
        return [e["type"] for e in self.events if e["data"]["id"] == subject_id]


@pytest.fixture(scope="module")
def service(ray_local, s3_server, tmp_path_factory):
    from ray import serve

    from dreamblend_ray.lifecycle.scheduler import scheduler_handle
    from dreamblend_ray.lifecycle.settings import ServiceSettings
    from dreamblend_ray.serving.app import build_app
    from test_serve import free_port

    from dreamblend_ray.serving.tenants import key_entry

    secrets = tmp_path_factory.mktemp("secrets")
    entries = [yaml.safe_load(key_entry(t, f"{t}-1", k)) for t, k in (("default", KEY), ("beta", KEY_B))]
    (secrets / "keys.yaml").write_text(yaml.safe_dump({"tenants": {**entries[0]["tenants"], **entries[1]["tenants"]}}))
    (secrets / "whsec").write_text(SECRET)
    root = f"s3://{s3_server.new_bucket('subjects')}/svc"
    port = free_port()
    args = {"base": "tiny", "storage_root": root, "default_steps": 4, "num_cpus": 0.1, "ingress_num_cpus": 0.1,
            "manifest_cache_s": 0, "auth_enabled": True, "keys_file": str(secrets / "keys.yaml"),
            "finetune_defaults": FINETUNE, "upload_min_side": 32, "upload_max_files": 4,
            "upload_max_file_bytes": 200_000, "upload_max_total_bytes": 400_000, "max_concurrent_trainings": 1,
            "training_num_cpus": 0.5, "job_num_cpus": 0.5, "webhook_secret_file": str(secrets / "whsec"),
            "allow_private_urls": True, "webhook_base_delay_s": 0.2, "webhook_max_attempts": 30}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="dreamblend", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers={"X-API-Key": KEY})
    try:
        yield {"client": client, "root": root, "args": args, "receiver": Receiver(), "s3": s3_server}
    finally:
        client.close()
        serve.shutdown()
        import ray

        actor = scheduler_handle(ServiceSettings(storage_root=root), create=False)
        if actor is not None:
            ray.kill(actor, no_restart=True)


def create(service, subject_id, color=(255, 0, 0), **fields):
    response = service["client"].post("/v1/subjects", files=files(color),
                                       data={"class_noun": "ball", "subject_id": subject_id, **fields})
    assert response.status_code == 202, response.text
    return response


def wait_for(service, subject_id, statuses=("ready", "failed", "canceled"), timeout=180, until=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = service["client"].get(f"/v1/subjects/{subject_id}").json()
        if body.get("status") in statuses or (until and until(body)):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{subject_id} stayed {body}")


def listing(service, subject_id) -> list[str]:
    return storage.list_files(storage.join(service["root"], "subjects", subject_id))


def test_create_train_generate_delete_with_signed_webhooks(service):
    client = service["client"]
    response = create(service, "rex", webhook_url=service["receiver"].url)
    body = response.json()
    assert response.headers["location"] == "/v1/subjects/rex"
    assert body["subject_id"] == "rex" and body["status"] in ("queued", "training")
    done = wait_for(service, "rex")
    assert done["status"] == "ready", done
    assert done["steps"] == [2, 4, 6] and done["progress"]["step"] == 6 and done["finished_at"]
    assert "rex" in client.get("/v1/subjects", params={"status": "ready"}).json()["subjects"]
    image = client.post("/v1/generate", json={"subject_id": "rex", "prompt": "a sks ball", "seed": 3})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    stored = listing(service, "rex")
    assert any(name.startswith("images/") for name in stored) and "subject.json" in stored
    assert client.delete("/v1/subjects/rex").status_code == 204
    assert listing(service, "rex") == []  # over S3: nothing of the subject is left
    assert client.get("/v1/subjects/rex").status_code == 404
    assert client.post("/v1/generate", json={"subject_id": "rex", "prompt": "a sks ball"}).status_code == 404
    assert client.delete("/v1/subjects/rex").status_code == 404  # deleting twice is harmless
    receiver = service["receiver"]
    deadline = time.monotonic() + 30
    while "subject.deleted" not in receiver.of("rex") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert receiver.of("rex") == ["subject.training", "subject.ready", "subject.deleted"]


def test_a_subject_that_is_not_ready_is_a_409_naming_its_status(service):
    client = service["client"]
    create(service, "slow", steps="150")
    body = wait_for(service, "slow", statuses=("training",))
    assert body["progress"] is None or body["progress"]["total"] == 150
    response = client.post("/v1/generate", json={"subject_id": "slow", "prompt": "a sks ball"})
    assert response.status_code == 409 and "training" in response.json()["detail"]
    assert client.post("/v1/subjects/slow/cancel").status_code == 202
    canceled = wait_for(service, "slow", statuses=("canceled",), timeout=30)
    assert canceled["finished_at"] and canceled["progress"]["step"] < 150
    response = client.post("/v1/generate", json={"subject_id": "slow", "prompt": "a sks ball"})
    assert response.status_code == 409 and "canceled" in response.json()["detail"]
    assert "slow" in client.get("/v1/subjects", params={"status": "canceled"}).json()["subjects"]
    assert client.delete("/v1/subjects/slow").status_code == 204


def test_a_killed_training_worker_resumes_from_its_last_checkpoint(service):
    create(service, "phoenix", steps="120")
    wait_for(service, "phoenix", statuses=(), until=lambda b: (b.get("progress") or {}).get("step", 0) >= 40)
    progress = storage.read_json(storage.join(service["root"], "subjects", "phoenix", "progress.json"))
    os.kill(progress["worker_pid"], signal.SIGKILL)  # the pid is in storage only, never in the API
    done = wait_for(service, "phoenix")
    assert done["status"] == "ready", done
    assert done["progress"]["attempt"] == 2
    manifest = storage.read_json(storage.join(service["root"], "subjects", "phoenix", "subject.json"))
    assert manifest["timings"]["resumed_after_step"] >= 12  # the 10% checkpoint at least, not step 0
    assert service["client"].delete("/v1/subjects/phoenix").status_code == 204


def test_the_scheduler_dying_mid_training_loses_nothing(service):
    import ray

    from dreamblend_ray.lifecycle.scheduler import scheduler_handle
    from dreamblend_ray.lifecycle.settings import ServiceSettings

    create(service, "lazarus", steps="120")
    wait_for(service, "lazarus", statuses=(), until=lambda b: (b.get("progress") or {}).get("step", 0) >= 20)
    ray.kill(scheduler_handle(ServiceSettings(storage_root=service["root"]), create=False), no_restart=False)
    done = wait_for(service, "lazarus")  # Ray restarts it; it finds the training and resumes it
    assert done["status"] == "ready", done
    assert done["progress"]["attempt"] >= 2
    assert service["client"].delete("/v1/subjects/lazarus").status_code == 204


def test_the_serve_app_restarted_mid_training_loses_nothing(service):
    """serve.delete and a new deployment while a subject trains: the scheduler (detached, state in
    storage) keeps the training; the new app answers for it and it ends ready."""
    from ray import serve

    from dreamblend_ray.serving.app import build_app

    create(service, "atlas", steps="120")
    wait_for(service, "atlas", statuses=(), until=lambda b: (b.get("progress") or {}).get("step", 0) >= 10)
    serve.delete("dreamblend")
    serve.run(build_app(service["args"]), name="dreamblend", route_prefix="/")
    done = wait_for(service, "atlas")
    assert done["status"] == "ready", done
    assert service["client"].post("/v1/generate", json={"subject_id": "atlas", "prompt": "a sks ball",
                                                        "num_inference_steps": 2}).status_code == 200
    assert service["client"].delete("/v1/subjects/atlas").status_code == 204


def test_delete_while_training_stops_it_and_erases_everything(service):
    client = service["client"]
    create(service, "ghost", steps="300")
    wait_for(service, "ghost", statuses=(), until=lambda b: (b.get("progress") or {}).get("step", 0) >= 5)
    started = time.monotonic()
    assert client.delete("/v1/subjects/ghost").status_code == 204
    assert time.monotonic() - started < 20
    time.sleep(2)  # a training still running would write progress or checkpoints again
    assert listing(service, "ghost") == []
    assert client.get("/v1/subjects/ghost").status_code == 404


def test_delete_while_generating_finishes_or_fails_cleanly_and_nothing_starts_after(service):
    from concurrent.futures import ThreadPoolExecutor

    client = service["client"]
    create(service, "echo", color=(0, 0, 255))
    assert wait_for(service, "echo")["status"] == "ready"
    body = {"subject_id": "echo", "prompt": "a sks ball", "num_inference_steps": 60, "seed": 1}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/v1/generate", json=body)
        time.sleep(1.0)
        assert client.delete("/v1/subjects/echo").status_code == 204
        response = running.result()
    assert response.status_code in (200, 404), response.text  # finished, or refused with a body
    assert client.post("/v1/generate", json={**body, "num_inference_steps": 2}).status_code == 404
    assert listing(service, "echo") == []


def test_idempotent_retries_make_one_subject(service):
    client = service["client"]
    headers = {"Idempotency-Key": "create-twice-1"}
    first = client.post("/v1/subjects", files=files(), data={"class_noun": "ball"}, headers=headers)
    again = client.post("/v1/subjects", files=files(), data={"class_noun": "ball"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["subject_id"] == again.json()["subject_id"] and again.json()["replayed"] is True
    other = client.post("/v1/subjects", files=files((0, 255, 0)), data={"class_noun": "ball"}, headers=headers)
    assert other.status_code == 422 and "Idempotency-Key" in other.text
    subject_id = first.json()["subject_id"]
    wait_for(service, subject_id)
    trainings = [n for n in client.get("/v1/subjects", params={"status": "ready"}).json()["subjects"]
                 if n.startswith("s-")]
    assert trainings.count(subject_id) == 1 and len(trainings) == 1
    assert client.post("/v1/subjects", files=files(), data={"class_noun": "ball", "subject_id": subject_id}
                       ).status_code == 409  # the id is taken
    assert client.delete(f"/v1/subjects/{subject_id}").status_code == 204


def truncated_png() -> bytes:
    data = ball_png((255, 0, 0))
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """A few hundred bytes that declare 30000 x 30000 pixels."""
    import struct
    import zlib

    data = bytearray(ball_png((255, 0, 0)))
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", 30000, 30000)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF)
    return bytes(data)


BAD_UPLOADS = {  # case: (the files beside one good image, status, rule, the file the answer names)
    "not-an-image": ([("images", ("notes.png", b"hello, not a png", "image/png"))], 422, "not_an_image", "notes.png"),
    "truncated": ([("images", ("half.png", truncated_png(), "image/png"))], 422, "truncated", "half.png"),
    "bomb": ([("images", ("bomb.png", bomb_png(), "image/png"))], 422, "pixels", "bomb.png"),
    "too-many": (files(count=4), 422, "count", None),
    "too-large": ([("images", ("big.png", os.urandom(250_000), "image/png"))], 413, "file_bytes", "big.png"),
}


@pytest.mark.parametrize("case", [*BAD_UPLOADS, "none"])
def test_bad_uploads_are_refused_and_leave_nothing(service, case):
    subject_id = "bad-" + case
    form = {"class_noun": "ball", "subject_id": subject_id}
    if case == "none":  # a form without files: nothing to train on
        parts = {name: (None, value) for name, value in form.items()}  # multipart, text fields only
        response = service["client"].post("/v1/subjects", files=parts)
        assert response.status_code == 422 and "count" in response.text, response.text
    else:
        bad, status, rule, named = BAD_UPLOADS[case]
        response = service["client"].post("/v1/subjects", files=files(count=1) + bad, data=form)
        assert response.status_code == status and rule in response.text, response.text
        assert named is None or named in response.text
    assert listing(service, subject_id) == []
    assert service["client"].get(f"/v1/subjects/{subject_id}").status_code == 404


def test_a_webhook_receiver_that_is_down_gets_the_event_once_it_is_up(service):
    receiver = service["receiver"]
    receiver.up.clear()
    create(service, "pager", webhook_url=receiver.url)
    assert wait_for(service, "pager")["status"] == "ready"
    deadline = time.monotonic() + 10
    while receiver.refused < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert receiver.refused >= 2 and receiver.of("pager") == []  # tried, refused, retried
    receiver.up.set()
    deadline = time.monotonic() + 60
    while len(receiver.of("pager")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert receiver.of("pager") == ["subject.training", "subject.ready"]  # each once, in order of creation
    time.sleep(1.0)
    assert receiver.of("pager") == ["subject.training", "subject.ready"]  # and never again
    assert service["client"].delete("/v1/subjects/pager").status_code == 204


def test_an_async_job_runs_the_bulk_job_and_serves_its_images(service):
    client = service["client"]
    create(service, "joby", color=(0, 255, 0))
    assert wait_for(service, "joby")["status"] == "ready"
    response = client.post("/v1/jobs", json={"requests": [
        {"subject_id": "joby", "prompt": "a sks ball", "seed": 5, "num_images": 2},
        {"subject_id": "joby", "prompts": ["a ball", "a sks ball at night"], "seed": 9}],
        "webhook_url": service["receiver"].url})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    deadline = time.monotonic() + 180
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "succeeded" and job["images_done"] == job["images_total"] == 4
    assert [r["seed"] for r in job["results"]] == [5, 6, 9, 9]
    png = client.get(job["results"][1]["url"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get(f"/v1/jobs/{job_id}/images/4").status_code == 404
    alone = client.post("/v1/generate", json={"subject_id": "joby", "prompt": "a sks ball", "seed": 6,
                                              "num_inference_steps": 4})
    assert np.abs(pixels(alone.content) - pixels(png.content)).max() <= 1  # the synchronous route's image
    deadline = time.monotonic() + 30
    while not any(e["type"] == "job.completed" and e["data"]["id"] == job_id for e in service["receiver"].events):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.delete("/v1/subjects/joby").status_code == 204
    assert client.get(job["results"][1]["url"]).status_code == 404  # its images went with it
    assert client.get(f"/v1/jobs/{job_id}").json()["results"][1]["error"] == "subject deleted"


def test_two_tenants_one_subject_id_two_adapters_on_one_replica(service):
    client = service["client"]
    beta = httpx.Client(base_url=str(client.base_url), timeout=120, headers={"X-API-Key": KEY_B})
    for who, color in ((client, (255, 0, 0)), (beta, (0, 0, 255))):
        response = who.post("/v1/subjects", files=files(color), data={"class_noun": "ball", "subject_id": "twin"})
        assert response.status_code == 202, response.text
    assert wait_for(service, "twin")["status"] == "ready"
    deadline = time.monotonic() + 120
    while beta.get("/v1/subjects/twin").json()["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    body = {"subject_id": "twin", "prompt": "a sks ball", "seed": 11, "alpha": 0.0}
    red, blue = client.post("/v1/generate", json=body), beta.post("/v1/generate", json=body)
    assert red.status_code == blue.status_code == 200
    assert red.headers["x-dreamblend-replica"] == blue.headers["x-dreamblend-replica"]  # one replica, both loaded
    assert np.abs(pixels(red.content) - pixels(blue.content)).max() > 0  # two adapters, not one shared
    again = client.post("/v1/generate", json=body)
    assert np.abs(pixels(again.content) - pixels(red.content)).max() <= 1  # and each keeps its own
    assert client.get("/healthz", params={"deep": "true"}).json()["model"]["loaded_models"].count("twin") == 1
    assert beta.get("/healthz", params={"deep": "true"}).json()["model"]["loaded_models"].count("twin") == 1
    assert beta.delete("/v1/subjects/twin").status_code == 204
    assert beta.post("/v1/generate", json=body).status_code == 404
    assert client.post("/v1/generate", json=body).status_code == 200  # the default tenant's twin stays
    assert storage.list_files(storage.join(service["root"], "tenants", "beta", "subjects", "twin")) == []
    assert client.delete("/v1/subjects/twin").status_code == 204
    beta.close()


def test_no_key_or_secret_in_any_log_file(service):
    """Every Ray, Serve and worker log of the session (the ingress, the replicas, the scheduler, the
    trainings) and the audit trail, grepped for the tenants' keys and the webhook secret."""
    import ray

    from dreamblend_ray.lifecycle.audit import read_events

    service["client"].get("/v1/subjects/nobody")  # at least one keyed request of each tenant
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("ServeReplica" in p.name or "serve" in str(p) for p in files)  # the logs are really there
    material = [KEY, KEY_B, SECRET, SECRET.removeprefix("whsec_")]
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for secret in material:
            assert secret not in text, f"key material in {path.name}"
    trail = json.dumps(read_events(service["root"]))
    assert all(secret not in trail for secret in material) and "subject.create" in trail
