"""The metrics on Ray's real Prometheus export, request ids in the replicas' lines, JSON logs (issue 30).

Starts `dreamblend serve --metrics-port P --log-format json` (its own local Ray cluster) on the tiny
model, with tenants from a keys file: ``acme`` has fine-tuned subjects, ``globex`` a quota of one
request a minute. It sends a known mix (generations, a bad request, a 429, a subject created and
trained by the service), scrapes the export with ``prometheus_client``'s text parser, and checks that
each counter moved by what the client saw and each histogram counted its observations. Then it
finds the request id it sent in the response, the model replica's log line and the ingress's JSON
access line, and parses every JSON log line.
"""

import io
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image, ImageDraw

from ball_subjects import finetune_balls
from test_lifecycle import DREAMBLEND, background, free_port, healthz_answers  # noqa: F401 - a fixture
from test_tenancy import keys_file
from dreamblend_ray.lifecycle import records
from dreamblend_ray.observability import catalog
from dreamblend_ray.serving.tenants import new_key
from dreamblend_ray.training.layout import tenant_root

pytestmark = pytest.mark.slow

STEPS = 3
KEYS = {"acme": new_key(), "globex": new_key()}
REQUEST_ID = "issue30-e2e-0123456789abcdef"
CREATE_ID = "issue30-create-fedcba9876543210"
FINETUNE = {"prior_preservation": False, "resolution": 32, "min_image_size": 32, "learning_rate": 5e-2,
            "steps": 4, "checkpoint_steps": [2, 4]}


def ball_png(shift: int) -> bytes:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(image).ellipse((12 + shift, 12, 48 + shift, 48), fill=(250, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, frozenset of our labels): value}, summed over Ray's per-worker series."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "otel_scope_name",
                  "otel_scope_schema_url", "otel_scope_version", "JobId"}
    values: dict[tuple, float] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_dreamblend_"):
                labels = frozenset((k, v) for k, v in sample.labels.items() if k not in ray_labels)
                values[(sample.name, labels)] += sample.value
    return values


def total(values: dict, name: str, **labels) -> float:
    wanted = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (sample, have), v in values.items() if sample == name and wanted <= have)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_components):
    root = tmp_path_factory.mktemp("metrics-store")
    finetune_balls(tiny_components, tenant_root(str(root), "acme"))
    return root


def serve_config(tmp_path: Path, root: Path) -> Path:
    keys = tmp_path / "keys.json"
    keys_file(keys, {"acme-1": ("acme", KEYS["acme"]), "globex-1": ("globex", KEYS["globex"])},
              quotas={"globex": {"requests_per_minute": 1}})
    args = {"base": "tiny", "storage_root": str(root), "default_steps": STEPS, "num_cpus": 0.5,
            "ingress_num_cpus": 0.1, "manifest_cache_s": 0, "keys_file": str(keys), "auth_enabled": True,
            "finetune_defaults": FINETUNE, "upload_min_side": 32, "max_concurrent_trainings": 1,
            "training_num_cpus": 0.5}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "dreamblend", "args": args}]}))
    return path


def test_metrics_request_ids_and_json_logs_end_to_end(background, store, tmp_path):  # noqa: F811
    port, metrics_port = free_port(), free_port()
    command = background([DREAMBLEND, "serve", "--log-format", "json", "--config", str(serve_config(tmp_path, store)),
                          "--port", str(port), "--metrics-port", str(metrics_port)],
                         RAY_metrics_report_interval_ms="1000")
    command.wait_for(healthz_answers(port), what="/healthz")
    url = f"http://127.0.0.1:{port}"
    acme = httpx.Client(base_url=url, headers={"X-API-Key": KEYS["acme"]}, timeout=120)
    seen: Counter = Counter()

    def call(client, method, route_template, path, **kwargs):
        answer = client.request(method, path, **kwargs)
        seen[(route_template, answer.status_code)] += 1
        return answer

    body = {"subject_id": "red", "prompt": "a photo of sks ball"}
    first = call(acme, "POST", "/v1/generate", "/v1/generate", json=body, headers={"X-Request-ID": REQUEST_ID})
    assert first.status_code == 200, first.text
    assert first.headers["x-request-id"] == REQUEST_ID and first.headers.get_list("x-request-id") == [REQUEST_ID]
    for seed in (1, 2):
        assert call(acme, "POST", "/v1/generate", "/v1/generate", json={**body, "seed": seed}).status_code == 200
    bad = call(acme, "POST", "/v1/generate", "/v1/generate", json={**body, "num_inference_steps": 0})
    assert bad.status_code == 422 and bad.headers["x-request-id"]
    replaced = acme.get("/v1/subjects", headers={"X-Request-ID": "bad id\twith tab"})
    seen[("/v1/subjects", replaced.status_code)] += 1
    assert replaced.headers["x-request-id"] != "bad id\twith tab"
    globex = httpx.Client(base_url=url, headers={"X-API-Key": KEYS["globex"]}, timeout=30)
    assert call(globex, "GET", "/v1/subjects", "/v1/subjects").status_code == 200
    assert call(globex, "GET", "/v1/subjects", "/v1/subjects").status_code == 429

    created = call(acme, "POST", "/v1/subjects", "/v1/subjects", data={"class_noun": "ball", "subject_id": "fresh"},
                   files=[("images", (f"b{i}.png", ball_png(i), "image/png")) for i in range(3)],
                   headers={"X-Request-ID": CREATE_ID})
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 240
    while True:
        state = call(acme, "GET", "/v1/subjects/{subject_id}", "/v1/subjects/fresh").json()
        if state["status"] in ("ready", "failed") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state["status"] == "ready", state
    assert records.read_state(tenant_root(str(store), "acme"), "fresh")["request_id"] == CREATE_ID

    # ---------------------------------------------------------------- the export
    def settled():
        values = scrape(metrics_port)
        return values if (total(values, "ray_dreamblend_images_generated_total") == 3
                          and total(values, "ray_dreamblend_trainings_total", state="ready") == 1
                          and all(total(values, "ray_dreamblend_http_requests_total", route=r, status=s) == n
                                  for (r, s), n in seen.items())) else None

    deadline, values = time.monotonic() + 60, None
    while values is None and time.monotonic() < deadline:
        time.sleep(1)
        values = settled()
    values = values or scrape(metrics_port)
    for (route, status), count in seen.items():
        assert total(values, "ray_dreamblend_http_requests_total", route=route, status=status) == count, (route, status)
    generate = seen[("/v1/generate", 200)] + seen[("/v1/generate", 422)]
    assert total(values, "ray_dreamblend_http_request_seconds_count", route="/v1/generate") == generate
    assert total(values, "ray_dreamblend_http_request_seconds_bucket", route="/v1/generate", le="+Inf") == generate
    assert total(values, "ray_dreamblend_http_rejections_total", status=429, reason="quota", tenant="globex") == 1
    assert total(values, "ray_dreamblend_http_request_bytes_total", route="/v1/generate", tenant="acme") > 0
    assert total(values, "ray_dreamblend_images_generated_total", batching="continuous", tenant="acme") == 3
    assert total(values, "ray_dreamblend_step_seconds_count", batching="continuous") == 3 * STEPS  # one at a time
    assert total(values, "ray_dreamblend_rows_per_unet_call_count") >= 3 * STEPS
    assert total(values, "ray_dreamblend_time_to_first_step_seconds_count") == 3
    assert total(values, "ray_dreamblend_adapter_cache_total", result="miss") == 1
    assert total(values, "ray_dreamblend_adapter_cache_total", result="hit") == 2
    assert total(values, "ray_dreamblend_adapter_loads_total") == 1
    assert total(values, "ray_dreamblend_denoise_seconds_total", part="guidance") > 0
    assert total(values, "ray_dreamblend_denoise_seconds_total", part="plain") > 0
    assert 0 < total(values, "ray_dreamblend_guided_share") < 1
    assert total(values, "ray_dreamblend_adapters_loaded") == 1  # gauges stay on the export while true
    assert total(values, "ray_dreamblend_queue_depth") == 0
    for state in ("queued", "training", "ready"):
        assert total(values, "ray_dreamblend_trainings_total", kind="service", state=state) == 1, state
    assert total(values, "ray_dreamblend_training_steps_total", kind="service") == FINETUNE["steps"]
    assert total(values, "ray_dreamblend_checkpoint_upload_seconds_count", kind="service") == 2
    assert total(values, "ray_dreamblend_training_seconds_count", kind="service") == 1
    exported = {name for name, _ in values}
    assert exported <= catalog.exported_series(), exported - catalog.exported_series()
    assert not any(value in ("red", "fresh") for _, labels in values for _, value in labels)  # no subject ids

    # ---------------------------------------------------------------- request ids and JSON logs
    replica_lines = json_lines(tmp_path.glob("model-*.log"))
    assert any(line.get("request_id") == REQUEST_ID and "image(s)" in line["message"] for line in replica_lines)
    access = [line for line in json_lines(tmp_path.glob("ingress-*.log")) if line["logger"] == "dreamblend_ray.access"]
    mine = [line for line in access if line.get("request_id") == REQUEST_ID]
    assert len(mine) == 1 and mine[0]["route"] == "/v1/generate" and mine[0]["status"] == 200
    assert mine[0]["tenant"] == "acme" and mine[0]["latency_ms"] > 0
    assert any(line.get("request_id") == CREATE_ID and line["status"] == 202 for line in access)
    assert not any(line["level"] == "ERROR" for line in access + replica_lines), "errors in the replicas' lines"
    driver = json_lines(tmp_path.glob("serve-*.log"))
    assert any("Prometheus metrics on" in line["message"] for line in driver)
    for key in KEYS.values():
        assert not any(key in path.read_text() for path in tmp_path.glob("*.log"))


def json_lines(paths) -> list[dict]:
    """Every line of the files, each parsed as one JSON object (a line that is not fails the test)."""
    lines = []
    for path in paths:
        for text in path.read_text().splitlines():
            if text.strip():
                lines.append(json.loads(text))
    assert lines, "no log lines"
    return lines
