"""Tenants over real HTTP (uvicorn on loopback), in process: the real ingress app, the real subject
scheduler without Ray (trainings admitted, never run), a real keys file, two tenants.

Every route that names a subject or a job answers another tenant's object exactly as a missing one
(404, the same body); keys rotate while requests run; a malformed keys file keeps the last good
table; quotas answer 429 naming the quota; two credentials that disagree are a 401; repeated 401s
from one address get 429s; every /v1 answer is no-store and nosniff; creates, deletes, cancels,
reloads and refusals reach the audit trail, and no key reaches a log line, an answer or the trail.
(The model replicas' side, (tenant, subject) adapters on one replica, is tests/test_subject_service.py.)
"""

import concurrent.futures as futures
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from api_fakes import InProcessScheduler, RecordingBackend, serve_on_loopback
from dreamblend_ray.io import storage
from dreamblend_ray.lifecycle.audit import read_events
from dreamblend_ray.serving import http as http_api
from dreamblend_ray.serving import requests as serving
from dreamblend_ray.serving.requests import AppArgs
from dreamblend_ray.serving.tenants import key_entry, new_key

KEYS = {name: new_key() for name in ("acme", "acme2", "globex")}


def keys_file(path: Path, entries: dict[str, tuple[str, str]], quotas: dict | None = None) -> None:
    """A keys file: key id -> (tenant, key); ``quotas`` per tenant."""
    tenants: dict = {}
    for key_id, (tenant, key) in entries.items():
        parsed = json.loads(json.dumps(__import__("yaml").safe_load(key_entry(tenant, key_id, key))))
        tenants.setdefault(tenant, {"keys": []})["keys"] += parsed["tenants"][tenant]["keys"]
    for tenant, values in (quotas or {}).items():
        tenants[tenant]["quotas"] = values
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tenants": tenants}))
    os.replace(tmp, path)  # as a Kubernetes secret update: atomic


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def service(tmp_path):
    root = str(tmp_path / "store")
    path = tmp_path / "keys.json"
    keys_file(path, {"acme-1": ("acme", KEYS["acme"]), "globex-1": ("globex", KEYS["globex"])},
              quotas={"globex": {"requests_per_minute": 1000, "images_per_minute": 2, "subjects": 2}})
    args = AppArgs(base="tiny", storage_root=root, auth_enabled=True, keys_file=str(path),
                   manifest_cache_s=0, upload_min_side=32, auth_failures_per_minute=5)
    scheduler = InProcessScheduler({"storage_root": root, "max_concurrent_trainings": 100})
    app = http_api.make_api(args, RecordingBackend(), serving.per_tenant(layout_read_manifest, root),
                            serving.per_tenant(layout_list, root), serving.per_tenant(serving.read_collapse_plot, root),
                            subject_service=scheduler)
    with serve_on_loopback(app) as url:
        yield {"url": url, "root": root, "keys_path": path, "scheduler": scheduler}


def layout_read_manifest(root, subject_id):
    from dreamblend_ray.training import layout

    return layout.read_manifest(root, subject_id)


def layout_list(root, after, limit):
    from dreamblend_ray.training import layout

    return layout.list_subject_ids(root, after, limit)


def as_(tenant: str, url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30)


def create(client, subject_id, color=(200, 0, 0)):
    return client.post("/v1/subjects", data={"class_noun": "dog", "subject_id": subject_id},
                       files=[("images", ("a.png", png(color), "image/png"))])


def make_ready(root: str, tenant: str, subject_id: str) -> None:
    """A finished subject as the jobs leave it: a manifest (the scheduler never trains here)."""
    from api_fakes import MANIFEST
    from dreamblend_ray.training import layout

    owned = layout.tenant_root(root, tenant)
    storage.write_json(layout.manifest_uri(owned, subject_id), {**MANIFEST, "subject_id": subject_id})
    storage.delete(storage.join(layout.subject_uri(owned, subject_id), "state.json"))


def test_another_tenants_objects_are_404s_with_the_missing_objects_body(service):
    acme, globex = as_("acme", service["url"]), as_("globex", service["url"])
    assert create(acme, "dog").status_code == 202
    make_ready(service["root"], "acme", "dog")
    job = acme.post("/v1/jobs", json={"subject_id": "dog", "prompt": "a sks dog", "seed": 1})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    calls = [("GET", "/v1/subjects/{s}"), ("GET", "/v1/subjects/{s}/collapse.png"), ("POST", "/v1/subjects/{s}/cancel"),
             ("DELETE", "/v1/subjects/{s}"), ("GET", "/v1/jobs/{j}"), ("GET", "/v1/jobs/{j}/images/0")]
    for method, template in calls:
        theirs = globex.request(method, template.format(s="dog", j=job_id))
        missing = globex.request(method, template.format(s="nobody", j="job-" + "0" * 16))
        assert theirs.status_code == missing.status_code == 404, (template, theirs.text)
        assert theirs.json()["detail"].replace("'dog'", "X").replace(f"'{job_id}'", "X") == \
            missing.json()["detail"].replace("'nobody'", "X").replace("'job-" + "0" * 16 + "'", "X")
        assert len(theirs.content) - len(missing.content) == len("dog") - len("nobody") if "{s}" in template \
            else len(theirs.content) == len(missing.content)
    generate = globex.post("/v1/generate", json={"subject_id": "dog", "prompt": "x"})
    assert generate.status_code == 404 and generate.json() == {"detail": "subject 'dog' not found"}
    their_job = globex.post("/v1/jobs", json={"subject_id": "dog", "prompt": "x"})
    assert their_job.status_code == 404
    assert globex.get("/v1/subjects").json()["subjects"] == []
    assert acme.get("/v1/subjects/dog").json()["status"] == "ready"  # untouched by the other tenant's calls
    assert acme.get(f"/v1/jobs/{job_id}").status_code == 200


def test_one_id_in_two_tenants_is_two_subjects(service):
    acme, globex = as_("acme", service["url"]), as_("globex", service["url"])
    assert create(acme, "rex", (255, 0, 0)).status_code == 202
    assert create(globex, "rex", (0, 0, 255)).status_code == 202  # not a 409: ids are per tenant
    root = service["root"]
    mine = Image.open(io.BytesIO(storage.read_bytes(f"{root}/tenants/acme/subjects/rex/images/0000.png")))
    mine = mine.getpixel((0, 0))
    theirs = Image.open(io.BytesIO(storage.read_bytes(f"{root}/tenants/globex/subjects/rex/images/0000.png")))
    assert mine == (255, 0, 0) and theirs.getpixel((0, 0)) == (0, 0, 255)
    assert globex.delete("/v1/subjects/rex").status_code == 204
    assert acme.get("/v1/subjects/rex").status_code == 200  # acme's rex survives globex's delete


def test_keys_rotate_without_a_restart_and_a_bad_file_keeps_the_last_good_one(service, caplog):
    url, path = service["url"], service["keys_path"]
    stop, failures, done = threading.Event(), [], [0]

    def hammer():
        with as_("acme", url) as client:
            while not stop.is_set():
                response = client.get("/v1/subjects")
                done[0] += 1
                if response.status_code != 200:
                    failures.append(response.status_code)

    with futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(hammer) for _ in range(2)]
        try:
            time.sleep(0.3)
            # add the new key, roll the client, remove the old one: the old key never fails in between
            keys_file(path, {"acme-1": ("acme", KEYS["acme"]), "acme-2": ("acme", KEYS["acme2"]),
                             "globex-1": ("globex", KEYS["globex"])})
            time.sleep(2.5)  # past the store's check interval (polling with 401s would trip the throttle)
            assert as_("acme2", url).get("/v1/subjects").status_code == 200, "the new key was not accepted"
        finally:
            stop.set()
        for future in running:
            future.result()
    assert done[0] > 10 and failures == []
    keys_file(path, {"acme-2": ("acme", KEYS["acme2"]), "globex-1": ("globex", KEYS["globex"])})
    time.sleep(2.5)
    assert as_("acme", url).get("/v1/subjects").status_code == 401  # the removed key
    with caplog.at_level(logging.WARNING):
        path.write_text("tenants: [this is not, a mapping")
        time.sleep(2.5)  # past the store's check interval
        assert as_("acme2", url).get("/v1/subjects").status_code == 200  # the last good table
        assert as_("globex", url).get("/v1/subjects").status_code == 200
    assert "keys file" in caplog.text.lower()
    for key in KEYS.values():
        assert key not in caplog.text


def test_quotas_answer_429_naming_the_quota(service):
    globex = as_("globex", service["url"])
    make_ready(service["root"], "globex", "pup")
    ok = globex.post("/v1/generate", json={"subject_id": "pup", "prompt": "a", "num_images": 2})
    assert ok.status_code == 200, ok.text
    refused = globex.post("/v1/generate", json={"subject_id": "pup", "prompt": "a"})
    assert refused.status_code == 429 and refused.json()["quota"] == "images_per_minute"
    assert int(refused.headers["retry-after"]) >= 1
    assert create(globex, "one").status_code == 202  # 'pup' and 'one': its 2 subjects
    over = create(globex, "two")
    assert over.status_code == 429 and over.json()["quota"] == "subjects", over.text
    assert create(as_("acme", service["url"]), "two").status_code == 202  # acme has no quotas


def test_two_credentials_that_disagree_are_a_401_and_401s_are_throttled(service):
    url = service["url"]
    both = {"Authorization": f"Bearer {KEYS['globex']}", "X-API-Key": KEYS["acme"]}
    assert httpx.get(f"{url}/v1/subjects", headers=both).status_code == 401
    junk = {"Authorization": "Basic Zm9vOmJhcg==", "X-API-Key": KEYS["acme"]}
    assert httpx.get(f"{url}/v1/subjects", headers=junk).status_code == 401  # Schemathesis' ST401 case
    same = {"Authorization": f"Bearer {KEYS['acme']}", "X-API-Key": KEYS["acme"]}
    assert httpx.get(f"{url}/v1/subjects", headers=same).status_code == 200
    statuses = [httpx.get(f"{url}/v1/subjects", headers={"X-API-Key": "wrong"}).status_code for _ in range(6)]
    assert statuses[:3] == [401] * 3 and statuses[-1] == 429  # 5 failures a minute, then wait
    throttled = httpx.get(f"{url}/v1/subjects", headers={"X-API-Key": KEYS["acme"]})
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1


def test_every_v1_answer_is_no_store_and_nosniff(service):
    acme = as_("acme", service["url"])
    for response in (acme.get("/v1/subjects"), acme.get("/v1/subjects/nobody"),
                     httpx.get(f"{service['url']}/v1/subjects"),
                     acme.post("/v1/generate", json={"subject_id": "x"})):
        assert response.headers["cache-control"] == "no-store", response.status_code
        assert response.headers["x-content-type-options"] == "nosniff"


def test_the_audit_trail_records_who_did_what_and_no_key(service, tmp_path):
    acme = as_("acme", service["url"])
    assert create(acme, "aud").status_code == 202
    assert acme.post("/v1/subjects/aud/cancel").status_code == 202
    assert acme.delete("/v1/subjects/aud").status_code == 204
    keys_file(service["keys_path"], {"acme-1": ("acme", KEYS["acme"]), "globex-1": ("globex", KEYS["globex"])})
    time.sleep(2.2)
    acme.get("/v1/subjects")  # the store notices the rewrite
    deadline = time.monotonic() + 10
    while True:
        events = read_events(service["root"])
        actions = [(e["action"], e.get("target")) for e in events]
        if ("keys.reload", None) in actions and ("subject.delete", "aud") in actions or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ("subject.create", "aud") in actions and ("subject.cancel", "aud") in actions
    assert ("subject.delete", "aud") in actions and ("keys.reload", None) in actions
    mine = [e for e in events if e.get("target") == "aud"]
    assert {e["tenant"] for e in mine} == {"acme"} and {e["key_id"] for e in mine} == {"acme-1"}
    trail = json.dumps(events)
    for key in KEYS.values():
        assert key not in trail


def test_the_bulk_jobs_write_under_their_tenant(monkeypatch):
    from dreamblend_ray.jobs import cli

    seen = {}
    monkeypatch.setattr(cli, "run_finetune_job", lambda subjects, output, **kw: seen.setdefault("finetune", output))
    def generate(requests, output, checkpoints_root=None, **kw):
        seen["generate"] = (output, checkpoints_root)
        return type("Result", (), {"failed": 0})()

    monkeypatch.setattr(cli, "run_generate_job", generate)
    args = cli.finetune_parser().parse_args(["--subjects", "s.jsonl", "--output", "s3://b/store", "--tenant", "acme"])
    cli.finetune_job_from_args(args)
    args = cli.generate_parser().parse_args(["--requests", "r.jsonl", "--output", "s3://b/out", "--checkpoints",
                                             "s3://b/store", "--tenant", "acme"])
    cli.run_generate_from_args(args)
    assert seen == {"finetune": "s3://b/store/tenants/acme",
                    "generate": ("s3://b/out/tenants/acme", "s3://b/store/tenants/acme")}
    default = cli.finetune_parser().parse_args(["--subjects", "s.jsonl", "--output", "s3://b/store"])
    assert default.tenant == "default"  # the root itself: stores written before tenants are default's
    with pytest.raises(SystemExit):
        cli.finetune_parser().parse_args(["--subjects", "s", "--output", "o", "--tenant", "../other"])


def test_a_json_body_without_a_json_content_type_is_refused(service):
    acme = as_("acme", service["url"])
    response = acme.post("/v1/jobs", content=b'{"subject_id": "x", "prompt": "y"}',
                         headers={"content-type": "text/plain"})
    assert response.status_code == 422  # FastAPI >= 0.165 does not parse it (pinned in pyproject)


def test_weak_single_keys_are_refused_at_start(monkeypatch, tmp_path):
    monkeypatch.setenv("DB_WEAK_KEY", "short-key")
    with pytest.raises(ValueError, match="too short"):
        serving.key_source(AppArgs(auth_enabled=True, api_key_env="DB_WEAK_KEY"))
    monkeypatch.setenv("DB_WEAK_KEY", "REPLACE_ME_WITH_A_LONG_RANDOM_STRING")  # the example secret's
    with pytest.raises(ValueError, match="placeholder"):
        serving.key_source(AppArgs(auth_enabled=True, api_key_env="DB_WEAK_KEY"))


def test_serve_refuses_auth_off_on_a_public_address():
    from dreamblend_ray.commands.serve import check_exposure

    check_exposure(AppArgs(), "127.0.0.1")  # loopback: fine
    with pytest.raises(ValueError, match="allow-insecure"):
        check_exposure(AppArgs(), "0.0.0.0")
    check_exposure(AppArgs(allow_insecure=True), "0.0.0.0")
    check_exposure(AppArgs(auth_enabled=True), "0.0.0.0")


def test_json_creates_read_only_allowed_sources(service, tmp_path):
    """image_uris: storage URIs under the service's own root (the default allow-list), never a
    server file, a path that climbs out, or a URL to a private or loopback host."""
    acme = as_("acme", service["url"])
    inside = storage.join(service["root"], "uploads", "a.png")
    storage.write_bytes(inside, png((10, 200, 10)))
    outside = tmp_path / "outside.png"
    outside.write_bytes(png((10, 200, 10)))
    ok = acme.post("/v1/subjects", json={"class_noun": "dog", "subject_id": "from-uri", "image_uris": [inside]})
    assert ok.status_code == 202, ok.text
    refused = {
        "a server file": "/etc/passwd",
        "a file outside the root": str(outside),
        "a climb out of the root": service["root"] + "/uploads/../../outside.png",
        "a loopback URL": "http://127.0.0.1:8000/v1/subjects",
        "a metadata URL": "http://169.254.169.254/latest/meta-data/",
        "a public host not allow-listed": "https://example.com/dog.png",
        "nothing there": storage.join(service["root"], "uploads", "missing.png"),
    }
    for what, uri in refused.items():
        response = acme.post("/v1/subjects", json={"class_noun": "dog", "subject_id": "bad-uri", "image_uris": [uri]})
        assert response.status_code == 422 and "image_uris[0]" in response.text, (what, response.text)
        assert "passwd" not in response.text and "meta-data" not in response.text  # the path is not echoed
    assert acme.get("/v1/subjects/bad-uri").status_code == 404
