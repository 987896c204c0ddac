"""Observability (issue 30), in-process: request ids, log formats, the metrics' local copies, the
access middleware, the replica's telemetry and the status view. The real Prometheus export of a
running `dreamblend serve` is scraped in tests/test_metrics_export.py.
"""

import json
import logging
import re

import pytest
from fastapi.testclient import TestClient

from api_fakes import RecordingBackend, list_subjects, read_collapse_plot, read_manifest
from dreamblend_ray.observability import catalog, context, logs, metrics
from dreamblend_ray.serving import access, http
from dreamblend_ray.serving.requests import AppArgs
from dreamblend_ray.serving.telemetry import ReplicaTelemetry

GOOD_ID = "req-2026-12-07T18:00:00Z-0123"


def client(**overrides) -> TestClient:
    args = AppArgs(**{"base": "tiny", "max_body_bytes": 2048, **overrides})
    app = http.make_api(args, RecordingBackend(), read_manifest, list_subjects, read_collapse_plot)
    return TestClient(app, raise_server_exceptions=False)


def series(name: str) -> set[tuple]:
    """The label sets a metric has recorded in this process."""
    return {key for key in metrics.get(name)._values}


# ------------------------------------------------------------------------------ request ids

@pytest.mark.parametrize("value, valid", [
    (GOOD_ID, True), ("0123456789abcdef0123456789abcdef", True), ("a" * 128, True),
    ("short", False), ("a" * 129, False), ("has space here", False), ("new\nline-injected", False),
    ('quote"s-and-more', False), ("", False), (None, False), (12345678, False)])
def test_request_ids_are_checked_for_length_and_characters(value, valid):
    assert context.valid_request_id(value) is valid
    accepted = context.accept_request_id(value)
    assert context.valid_request_id(accepted)
    assert (accepted == value) is valid


def test_a_valid_request_id_is_echoed_and_a_bad_one_replaced_on_every_answer():
    api = client()
    ok = api.get("/v1/subjects", headers={"X-Request-ID": GOOD_ID})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == GOOD_ID
    missing = api.get("/v1/subjects/nobody", headers={"X-Request-ID": GOOD_ID})  # errors too
    assert missing.status_code == 404 and missing.headers["x-request-id"] == GOOD_ID
    bad = api.get("/v1/subjects", headers={"X-Request-ID": "not an id <script>"})
    assert bad.headers["x-request-id"] != "not an id <script>"
    assert context.valid_request_id(bad.headers["x-request-id"])
    fresh = api.get("/v1/subjects")
    assert context.valid_request_id(fresh.headers["x-request-id"])
    assert fresh.headers["x-request-id"] != bad.headers["x-request-id"]
    too_large = api.post("/v1/generate", content=b"x" * 4096, headers={"X-Request-ID": GOOD_ID,
                                                                         "content-type": "application/json"})
    assert too_large.status_code == 413 and too_large.headers["x-request-id"] == GOOD_ID


def test_the_request_id_reaches_the_generation_job():
    backend = RecordingBackend()
    api = TestClient(http.make_api(AppArgs(base="tiny"), backend, read_manifest, list_subjects,
                                   read_collapse_plot))
    answer = api.post("/v1/generate", json={"subject_id": "dog", "prompt": "a photo of sks dog"},
                      headers={"X-Request-ID": GOOD_ID})
    assert answer.status_code == 200
    assert backend.jobs[-1].request_id == GOOD_ID


def test_behind_serves_proxy_the_header_is_not_doubled():
    args = AppArgs(base="tiny")
    api = TestClient(http.make_api(args, RecordingBackend(), read_manifest, list_subjects, read_collapse_plot,
                                   behind_proxy=True))
    kept = api.get("/v1/subjects", headers={"X-Request-ID": GOOD_ID})
    assert "x-request-id" not in kept.headers  # the proxy puts its (same) id on the response
    replaced = api.get("/v1/subjects", headers={"X-Request-ID": "bad id"})
    assert context.valid_request_id(replaced.headers["x-request-id"])


async def _asgi_echo(scope, receive, send):
    ids = [v.decode() for k, v in scope["headers"] if k == b"x-request-id"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(ids).encode()})


@pytest.mark.parametrize("sent, kept", [([GOOD_ID], True), (["bad id"], False), ([GOOD_ID, GOOD_ID], False),
                                        ([], None)])
def test_the_proxy_guard_replaces_a_bad_id_before_serve_reads_it(sent, kept):
    from starlette.applications import Starlette

    guarded = context.RequestIdGuard(_asgi_echo)
    answer = TestClient(guarded).get("/", headers=[("x-request-id", value) for value in sent])
    seen = answer.json()
    if kept is None:
        assert seen == []  # Serve's own middleware generates one
    else:
        assert len(seen) == 1 and context.valid_request_id(seen[0]) and (seen[0] == sent[0]) is kept
    middlewares = context.proxy_middlewares()
    assert middlewares[0].cls is context.RequestIdGuard and Starlette  # what Serve's proxy callback gets


# ------------------------------------------------------------------------------ log lines

def test_json_lines_carry_the_context_and_parse():
    record = logging.LogRecord("dreamblend_ray.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    with context.bound(request=GOOD_ID, tenant_id="acme", route_template="/v1/generate"):
        logs.ContextFilter().filter(record)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "INFO" and line["logger"] == "dreamblend_ray.x"
    assert (line["request_id"], line["tenant"], line["route"]) == (GOOD_ID, "acme", "/v1/generate")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    text = logs.TextFormatter().format(record)
    assert f"dreamblend_ray.x [{GOOD_ID}]: hello world" in text
    with pytest.raises(ValueError, match="log format"):
        logs.formatter("yaml")


def test_log_format_json_on_a_command_writes_one_object_per_line(tmp_path, capsys):
    from dreamblend_ray.runtime import lifecycle

    path = lifecycle.setup_logging("unit", log_file=str(tmp_path / "x.log"), log_format="json")
    try:
        log = logging.getLogger("dreamblend_ray.unit")
        with context.bound(request=GOOD_ID):
            log.info("with an id", extra={"status": 200, "latency_ms": 1.5})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        lifecycle.teardown_logging()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert any(line.get("request_id") == GOOD_ID and line["status"] == 200 for line in lines)
    assert any("boom" in line.get("exc", "") for line in lines)
    console = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert any(line["message"] == "with an id" for line in console)


def test_the_access_line_has_route_status_latency_tenant_and_id(caplog):
    api = client()
    with caplog.at_level(logging.INFO, logger="dreamblend_ray.access"):
        api.get("/v1/subjects/dog", headers={"X-Request-ID": GOOD_ID})
    line = [r for r in caplog.records if r.name == "dreamblend_ray.access"][-1]
    assert (line.route, line.status, line.request_id, line.tenant) == ("/v1/subjects/{subject_id}", 200, GOOD_ID,
                                                                       "default")
    assert line.latency_ms >= 0 and line.bytes_out > 0
    assert "dog" not in line.route


# ------------------------------------------------------------------------------ metrics

def test_every_catalog_metric_is_well_formed_and_has_bounded_labels():
    names = [spec.name for spec in catalog.CATALOG]
    assert len(names) == len(set(names))
    for spec in catalog.CATALOG:
        assert spec.description and spec.unit
        assert not {"subject", "subject_id", "prompt", "model_id", "request_id", "key"} & set(spec.labels)
    with pytest.raises(ValueError, match="start with"):
        catalog.MetricSpec("other_x", "counter", "ingress", "x", (), "d")
    with pytest.raises(ValueError, match="boundaries"):
        catalog.MetricSpec("dreamblend_x", "histogram", "ingress", "x", (), "d")


def test_a_wrong_label_or_kind_is_an_error_not_a_new_series():
    counter = metrics.get("http_requests")
    with pytest.raises(ValueError, match="labels"):
        counter.inc(route="/x", method="GET", status=200)
    with pytest.raises(ValueError, match="labels"):
        counter.inc(route="/x", method="GET", status=200, tenant="t", subject="dog")
    with pytest.raises(ValueError, match="counter"):
        counter.observe(1.0, route="/x", method="GET", status=200, tenant="t")


def test_metrics_can_be_turned_off():
    counter = metrics.get("adapter_loads")
    before = counter.value(family="off-test")
    metrics.set_enabled(False)
    try:
        counter.inc(family="off-test")
    finally:
        metrics.set_enabled(True)
    assert counter.value(family="off-test") == before
    counter.inc(family="off-test")
    assert counter.value(family="off-test") == before + 1


def test_http_metrics_move_by_what_was_answered():
    api = client()
    requests = metrics.get("http_requests")
    seconds = metrics.get("http_request_seconds")
    rejections = metrics.get("http_rejections")
    route = "/v1/generate"
    before = {s: requests.value(route=route, status=s) for s in (200, 413, 422)}
    observed = seconds.count(route=route)
    rejected = rejections.value(reason="body_too_large")
    bytes_in = metrics.get("http_request_bytes").value(route=route)
    body = {"subject_id": "dog", "prompt": "a photo of sks dog"}
    assert api.post(route, json=body).status_code == 200
    assert api.post(route, json=body).status_code == 200
    assert api.post(route, json={**body, "num_inference_steps": 0}).status_code == 422
    assert api.post(route, content=b"{" * 4096, headers={"content-type": "application/json"}).status_code == 413
    assert {s: requests.value(route=route, status=s) - before[s] for s in before} == {200: 2, 413: 1, 422: 1}
    assert seconds.count(route=route) - observed == 4
    assert rejections.value(reason="body_too_large") - rejected == 1
    assert metrics.get("http_request_bytes").value(route=route) - bytes_in >= 3 * len(json.dumps(body))


def test_label_cardinality_stays_bounded_over_100_subjects():
    api = client()
    before = {name: len(series(name)) for name in ("http_requests", "http_request_seconds", "http_request_bytes")}
    for k in range(100):
        api.get(f"/v1/subjects/subject-{k:03d}")
        api.post("/v1/generate", json={"subject_id": f"subject-{k:03d}", "prompt": "a photo"})
    for name, count in before.items():
        grown = len(series(name)) - count
        assert grown <= 4, f"{name} gained {grown} series over 100 subjects"
        assert not any("subject-" in value for key in series(name) for _, value in key)
    telemetry = ReplicaTelemetry("sd1")
    for k in range(100):
        telemetry.images("continuous", 1, tenant="default")
        telemetry.cache(hit=k % 2 == 0)
    assert len([key for key in series("images_generated") if dict(key)["family"] == "sd1"]) <= 2


def test_rejection_reasons_come_from_the_handlers():
    from dreamblend_ray.serving.requests import Overloaded

    class Busy(RecordingBackend):
        async def generate(self, job):
            raise Overloaded("queue full")

    api = TestClient(http.make_api(AppArgs(base="tiny"), Busy(), read_manifest, list_subjects, read_collapse_plot),
                     raise_server_exceptions=False)
    rejections = metrics.get("http_rejections")
    before = rejections.value(status=503, reason="overloaded")
    assert api.post("/v1/generate", json={"subject_id": "dog", "prompt": "p"}).status_code == 503
    assert rejections.value(status=503, reason="overloaded") - before == 1


# ------------------------------------------------------------------------------ the replica and the status view

def test_replica_telemetry_reports_steps_and_the_guided_share():
    telemetry = ReplicaTelemetry("unit-family")
    telemetry.queue("continuous", 3)
    telemetry.rows("continuous", 5)
    telemetry.step("continuous", [2, 5, 7], 0.2, guidance_s=0.05)
    telemetry.step("continuous", [5], 0.1, guidance_s=0.0)
    telemetry.step("static", [4], 0.3)  # the static path does not split its time
    snap = telemetry.snapshot()
    assert snap["queue_depth"] == 3 and snap["active_rows"] == 5 and snap["recent_steps"] == 3
    assert snap["guided_share"] == pytest.approx(0.05 / 0.3, abs=1e-3)
    assert snap["max_rows_per_step"] == 7
    labels = {"family": "unit-family", "batching": "continuous"}
    assert metrics.get("rows_per_unet_call").count(**labels) == 4
    assert metrics.get("step_seconds").count(**labels) == 2
    parts = metrics.get("denoise_seconds")
    assert parts.value(part="guidance", **labels) == pytest.approx(0.05)
    assert parts.value(part="plain", **labels) == pytest.approx(0.25)


def test_the_status_view_shows_the_batch_and_only_the_callers_subjects():
    api = client()
    for _ in range(3):
        api.post("/v1/generate", json={"subject_id": "dog", "prompt": "a photo of sks dog"})
    view = api.get("/v1/status").json()
    assert view["queue_depth"] == 2 and view["rows_per_step"] == 2.5 and view["guided_share"] == 0.4
    assert view["loaded_subjects"] == ["dog"]  # acme's cat is another tenant's
    assert view["latency"]["count"] == 3 and view["latency"]["p95_ms"] >= view["latency"]["p50_ms"] > 0


def test_failure_reasons_are_a_small_fixed_set():
    class StorageError(OSError):
        pass

    cases = [(ValueError("bad"), "bad_input"), (FileNotFoundError("x"), "bad_input"),
             (StorageError("s3 down"), "storage"), (RuntimeError("CUDA out of memory"), "out_of_memory"),
             (RuntimeError("the worker died unexpectedly"), "worker_died"), (KeyError("x"), "error")]
    for exc, reason in cases:
        assert metrics.failure_reason(exc) == reason
        assert reason in catalog.TRAINING_FAILURES


def test_every_serving_pod_installs_the_request_id_guard_in_its_proxy():
    """A Serve proxy runs on every pod of the RayService: each container names the callback, and the
    callback is importable (what the proxy does with the env var)."""
    import importlib
    from pathlib import Path

    import yaml

    manifest = yaml.safe_load((Path(__file__).parents[1] / "k8s/base/rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert env.get(context.PROXY_CALLBACK_ENV) == context.PROXY_CALLBACK, container["name"]
    module, name = context.PROXY_CALLBACK.split(":")
    assert [m.cls for m in getattr(importlib.import_module(module), name)()] == [context.RequestIdGuard]
