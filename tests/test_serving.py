"""The serving logic without Ray: request validation, limits, model ids, grouping, auth, HTTP errors.

The HTTP layer runs in-process (FastAPI's TestClient) over a recording backend; the real Ray
deployments and the real sampler are exercised end to end in test_serve.py.
"""

import asyncio
import base64
import io
import json
import pickle

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dreamblend_ray import config as cfg
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.io.storage import StorageError
from dreamblend_ray.serving import http
from dreamblend_ray.serving import batching
from dreamblend_ray.serving import requests as serving
from dreamblend_ray.serving.batching import GenerationJob
from dreamblend_ray.serving.http import ManifestCache
from dreamblend_ray.serving.requests import AppArgs, FieldError, GenerateRequest, SubjectConflict

from api_fakes import MANIFEST, RecordingBackend, list_subjects, read_collapse_plot, read_manifest  # noqa: E402


def client(backend=None, **overrides) -> tuple[TestClient, RecordingBackend]:
    backend = backend or RecordingBackend()
    args = AppArgs(**{"base": "tiny", "max_body_bytes": 1024, **overrides})
    return TestClient(http.make_api(args, backend, read_manifest, list_subjects, read_collapse_plot),
                      raise_server_exceptions=False), backend


# ------------------------------------------------------------------------------ pure functions

def test_model_id_round_trip_and_rejects_garbage():
    for g, e, text in [(None, None, "dog"), (2, None, "dog@g2"), (None, 6, "dog@e6"), (2, 6, "dog@g2,e6")]:
        assert serving.model_id_for("dog", g, e) == text
        assert serving.parse_model_id(text) == ("default", "dog", g, e)
        assert serving.model_id_for("dog", g, e, tenant="acme") == "acme~" + text
        assert serving.parse_model_id("acme~" + text) == ("acme", "dog", g, e)
    assert serving.parse_model_id("acme~dog").owner == ("acme", "dog") != serving.parse_model_id("dog").owner
    for bad in ("", "d/og", "dog@", "dog@x3", "dog@g", "dog@g1,g2", "dog@g-1", "Acme~dog", "~dog", "a~b~dog"):
        with pytest.raises(ValueError):
            serving.parse_model_id(bad)


def test_build_job_one_seed_per_image_and_defaults():
    args = AppArgs(base="tiny", default_steps=7, max_images_per_request=8)
    request = GenerateRequest(subject_id="dog", prompts=["a", "b"], num_images=3, negative_prompt="blur")
    job = serving.build_job(request, args, seed=10, now=100.0)
    assert job.prompts == ["a", "a", "a", "b", "b", "b"]
    assert job.seeds == [10, 11, 12, 13, 14, 15]
    assert job.negative_prompts == ["blur"] * 6
    assert job.config == SamplingConfig(num_inference_steps=7, guidance_scale=args.default_guidance_scale,
                                        alpha=args.default_alpha)
    assert job.deadline == 100.0 + args.request_timeout_s
    assert job.model_id == "dog"


def test_limits_name_the_field():
    args = AppArgs(base="tiny", max_images_per_request=4, max_prompts=2, max_inference_steps=10, default_steps=5)
    cases = {
        "num_images": GenerateRequest(subject_id="dog", prompt="x", num_images=5),
        "prompts": GenerateRequest(subject_id="dog", prompts=["a", "b", "c"]),
        "num_inference_steps": GenerateRequest(subject_id="dog", prompt="x", num_inference_steps=11),
        "response_format": GenerateRequest(subject_id="dog", prompt="x", num_images=2, response_format="png"),
    }
    for name, request in cases.items():
        with pytest.raises(FieldError) as info:
            serving.check_limits(request, args)
        assert info.value.field == name
    with pytest.raises(FieldError) as info:  # SamplingConfig's own check, K <= T
        serving.sampling_config(GenerateRequest(subject_id="dog", prompt="x", num_inference_steps=5,
                                                  guidance_steps=6), args)
    assert info.value.field == "guidance_steps"


def test_eta_schedule_is_the_requests_or_the_samplers_default():
    args = AppArgs(base="tiny")
    asked = GenerateRequest(subject_id="dog", prompt="x", eta_schedule="constant")
    assert serving.sampling_config(asked, args).eta_schedule == "constant"
    assert serving.sampling_config(GenerateRequest(subject_id="dog", prompt="x"), args).eta_schedule == "linear"


def test_field_error_survives_pickling():
    error = pickle.loads(pickle.dumps(FieldError("num_images", "too many")))
    assert (error.field, error.message) == ("num_images", "too many")


def test_overrides_checked_and_canonical():
    request = GenerateRequest(subject_id="dog", prompt="x", guidance_step=2, edit_step=4)
    canonical = serving.canonical_overrides(request, MANIFEST)
    assert (canonical.guidance_step, canonical.edit_step) == (None, 4)  # 2 is the default G
    with pytest.raises(SubjectConflict) as info:  # a conflict with the subject's saved steps: 409
        serving.canonical_overrides(GenerateRequest(subject_id="dog", prompt="x", edit_step=5), MANIFEST)
    assert info.value.field == "edit_step"


def test_group_jobs_by_model_and_settings():
    s1 = SamplingConfig(num_inference_steps=4, guidance_scale=3.0, alpha=0.2)
    s2 = SamplingConfig(num_inference_steps=5, guidance_scale=3.0, alpha=0.2)
    jobs = [GenerationJob("a", ["p"], [1], s1), GenerationJob("b", ["p"], [1], s1),
            GenerationJob("a", ["p"], [2], s1, negative_prompts=["n"]), GenerationJob("a", ["p"], [3], s2)]
    assert batching.group_jobs(jobs) == [[0, 2], [1], [3]]
    assert batching.take_group(jobs, 8) == [0, 2] and batching.take_group(jobs, 1) == [0]
    assert batching.take_group(jobs[1:], 8) == [0] and batching.take_group([], 8) == []


def test_equal_settings_make_equal_hashable_group_keys():
    """The SamplingConfig built at the ingress is the group key itself: two requests with equal
    settings (one given, one from the app's defaults) share a key, a different alpha does not."""
    args = AppArgs(base="tiny")
    given = GenerateRequest(subject_id="dog", prompt="a", num_inference_steps=args.default_steps,
                            alpha=args.default_alpha)
    defaults = GenerateRequest(subject_id="dog", prompt="b", seed=9)
    other = GenerateRequest(subject_id="dog", prompt="a", alpha=args.default_alpha + 0.5)
    keys = [serving.build_job(request, args, seed=1).group_key for request in (given, defaults, other)]
    assert keys[0] == keys[1] and hash(keys[0]) == hash(keys[1])
    assert keys[2] != keys[0] and len({keys[0], keys[1], keys[2]}) == 2
    assert isinstance(keys[0][1], SamplingConfig) and keys[2][1].alpha == args.default_alpha + 0.5
    job = pickle.loads(pickle.dumps(serving.build_job(given, args, seed=1)))  # what Ray sends the replica
    assert job.group_key == keys[0] and job.config.window == keys[0][1].window


@pytest.mark.parametrize("name", [n for n in serving.SAMPLING_FIELDS
                                  if cfg.field_type(SamplingConfig, n).base in (int, float)])
def test_request_bounds_of_sampling_fields_are_the_declared_ones(name):
    """The HTTP body's sampling fields take their bounds and description from config.spec, so they
    cannot drift; an app limit (max_inference_steps) only narrows them, and AppArgs's default_*
    fields share the same bounds."""
    rule = cfg.spec(SamplingConfig, name)
    kind = "integer" if cfg.field_type(SamplingConfig, name).base is int else "number"
    prop = GenerateRequest.model_json_schema()["properties"][name]
    assert prop["anyOf"][0] == {"type": kind, "minimum": rule.low, "maximum": rule.high}
    assert prop["anyOf"][1] == {"type": "null"} and prop["description"] == rule.help
    args = AppArgs(base="tiny", max_inference_steps=50)
    narrowed = serving.request_model(args).model_json_schema()["properties"][name]["anyOf"][0]
    limit = {"num_inference_steps": 50, "guidance_steps": 50, "maps_stop": 50, "maps_start": 49}.get(name, rule.high)
    assert (narrowed["minimum"], narrowed["maximum"]) == (rule.low, min(limit, rule.high))
    app_field = serving.SAMPLING_FIELDS[name]
    if app_field is not None:
        app = AppArgs.model_json_schema()["properties"][app_field]
        assert (app["minimum"], app["maximum"]) == (rule.low, rule.high)
        with pytest.raises(ValueError, match=app_field):
            AppArgs(**{app_field: rule.high + 1})
    with pytest.raises(ValueError, match=name):
        GenerateRequest(subject_id="dog", prompt="x", **{name: rule.high + 1})
    assert getattr(GenerateRequest(subject_id="dog", prompt="x", **{name: rule.high}), name) == rule.high


def test_seeds_and_prompts_use_the_one_range_and_limit():
    props = GenerateRequest.model_json_schema()["properties"]
    assert props["seed"]["anyOf"][0]["maximum"] == cfg.MAX_SEED == 2**53 - 1
    assert props["prompt"]["anyOf"][0]["maxLength"] == cfg.MAX_PROMPT_CHARS
    assert GenerateRequest(subject_id="dog", prompt="x", seed=cfg.MAX_SEED).seed == cfg.MAX_SEED
    with pytest.raises(ValueError, match="seed"):
        GenerateRequest(subject_id="dog", prompt="x", seed=cfg.MAX_SEED + 1)
    job = serving.build_job(GenerateRequest(subject_id="dog", prompt="x", num_images=2), AppArgs(base="tiny"),
                            seed=cfg.MAX_SEED)
    assert job.seeds == [cfg.MAX_SEED, 0]  # image k: (seed + k) modulo MAX_SEED + 1


class FakeSampler:
    """Records the call; image colour encodes the seed so that the split can be checked."""

    def __init__(self):
        self.calls = []

    def sample(self, pair, prompts, seeds, config, negative_prompts=None, callback=None, step_lock=None):
        import torch

        self.calls.append((list(prompts), list(seeds), negative_prompts, config))
        images = [Image.new("RGB", (4, 4), (s % 256, 0, 0)) for s in seeds]
        return type("R", (), {"images": images, "attention_distance": torch.ones(len(seeds), 2) * 2,
                              "seconds": 0.5})()


def test_run_group_one_call_and_split_back():
    settings = SamplingConfig(num_inference_steps=4, guidance_scale=3.0, alpha=0.2, guidance_steps=2)
    jobs = [GenerationJob("a", ["p", "p"], [5, 6], settings), GenerationJob("a", ["q"], [9], settings, ["n"])]
    sampler = FakeSampler()
    outputs = batching.run_group(sampler, object(), jobs)
    assert len(sampler.calls) == 1
    prompts, seeds, negatives, config = sampler.calls[0]
    assert (prompts, seeds, negatives) == (["p", "p", "q"], [5, 6, 9], ["", "", "n"])
    assert config is settings  # the job's validated config, passed on as is
    reds = [[Image.open(io.BytesIO(b)).getpixel((0, 0))[0] for b in out[0]] for out in outputs]
    assert reds == [[5, 6], [9]]
    assert outputs[0][1] == [2.0, 2.0]


def test_app_args_consistency():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        AppArgs(max_batch_size=8, max_ongoing_requests=4)
    with pytest.raises(ValueError, match="min_replicas"):
        AppArgs(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        AppArgs(unknown_field=1)
    assert AppArgs(min_replicas=1, max_replicas=3).autoscaling_config()["max_replicas"] == 3


def test_api_key_from_file_or_env(tmp_path, monkeypatch):
    monkeypatch.delenv("DB_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key"):
        serving.load_api_key(AppArgs(auth_enabled=True, api_key_env="DB_TEST_KEY"))
    assert serving.load_api_key(AppArgs(api_key_env="DB_TEST_KEY")) is None
    monkeypatch.setenv("DB_TEST_KEY", "from-env")
    assert serving.load_api_key(AppArgs(auth_enabled=True, api_key_env="DB_TEST_KEY")) == "from-env"
    secret = tmp_path / "api-key"
    secret.write_text("from-file\n")
    assert serving.load_api_key(AppArgs(auth_enabled=True, api_key_file=str(secret))) == "from-file"
    assert serving.key_matches("abc", "abc") and not serving.key_matches("abd", "abc")
    assert not serving.key_matches(None, "abc")


def test_manifest_cache_ttl():
    reads = []

    def read(subject_id, tenant="default"):
        reads.append(subject_id)
        return read_manifest(subject_id, tenant)

    now = [0.0]
    cache = ManifestCache(read, ttl_s=5, clock=lambda: now[0])
    asyncio.run(cache.get("dog"))
    asyncio.run(cache.get("dog"))
    now[0] = 6.0
    asyncio.run(cache.get("dog"))
    assert reads == ["dog", "dog"]
    with pytest.raises(serving.SubjectNotFound):
        asyncio.run(cache.get("cat"))


# ------------------------------------------------------------------------------ HTTP, in process

STRONG_KEY = "serving-k3y-7f2a9c01d4e5b6a8c9d0e1f2"
KEY_HEADERS = {"X-API-Key": STRONG_KEY}


def strict_json(response) -> object:
    """The body parsed as standard JSON (NaN/Infinity refused): what any client can read."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(response.content, parse_constant=refuse)


def test_png_for_one_image_json_for_several():
    http, backend = client()
    response = http.post("/v1/generate", json={"subject_id": "dog", "prompt": "a dog", "seed": 3})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (8, 8)
    assert response.headers["x-dreamblend-batch-size"] == "1"
    assert response.headers["x-dreamblend-seed"] == "3"
    response = http.post("/v1/generate", json={"subject_id": "dog", "prompt": "a dog", "num_images": 2,
                                               "seed": 3, "edit_step": 4})
    body = response.json()
    assert response.status_code == 200 and body["seeds"] == [3, 4] and body["model_id"] == "dog@e4"
    assert all(Image.open(io.BytesIO(base64.b64decode(b))).format == "PNG" for b in body["images"])
    assert [job.model_id for job in backend.jobs] == ["dog", "dog@e4"]


@pytest.mark.parametrize("body,status,field", [
    ({"subject_id": "cat", "prompt": "x"}, 404, None),
    ({"subject_id": "d/og", "prompt": "x"}, 422, "subject_id"),
    ({"subject_id": "dog"}, 422, None),
    ({"subject_id": "dog", "prompt": "x", "prompts": ["y"]}, 422, None),
    ({"subject_id": "dog", "prompt": "x", "num_images": 0}, 422, "num_images"),
    ({"subject_id": "dog", "prompt": "x", "num_images": 50}, 422, "num_images"),
    ({"subject_id": "dog", "prompts": ["x", "y"], "num_images": 3}, 422, "num_images"),  # 6 images > 4
    ({"subject_id": "dog", "prompts": ["x"] * 9}, 422, "prompts"),
    ({"subject_id": "dog", "prompt": "x", "alpha": -1}, 422, "alpha"),
    ({"subject_id": "dog", "prompt": "x", "guidance_scale": "high"}, 422, "guidance_scale"),
    ({"subject_id": "dog", "prompt": "x", "num_images": "2"}, 422, "num_images"),  # a string is not a number
    ({"subject_id": "dog", "prompt": "x", "num_images": True}, 422, "num_images"),  # nor is true
    ({"subject_id": "dog", "prompt": "x", "seed": -5}, 422, "seed"),
    ({"subject_id": "dog", "prompt": "x", "num_inference_steps": 4, "guidance_steps": 9}, 422, "guidance_steps"),
    ({"subject_id": "dog", "prompt": "x", "guidance_steps": 31}, 422, "guidance_steps"),  # > default_steps
    ({"subject_id": "dog", "prompt": "x", "edit_step": 5}, 409, None),  # not a saved step of dog
    ({"subject_id": "dog", "prompt": "x", "guidance_step": 0}, 422, "guidance_step"),
    ({"subject_id": "dog", "prompt": "x", "response_format": "gif"}, 422, "response_format"),
    ({"subject_id": "dog", "prompt": "x", "eta_schedule": "wobbly"}, 422, "eta_schedule"),  # not a schedule
    ({"subject_id": "dog", "prompt": "x", "eta_schedule": "Linear; drop"}, 422, "eta_schedule"),
    ({"subject_id": "dog", "prompt": "x", "num_images": 2, "response_format": "png"}, 422, "response_format"),
    ({"subject_id": "dog", "prompt": "x", "colour": "red"}, 422, "colour"),
    ({"subject_id": "dog", "prompt": "\ud800"}, 422, "prompt"),  # a lone surrogate is not text
    ({"subject_id": "dog", "prompts": ["ok", "\udfff"]}, 422, "prompts"),
])
def test_bad_input_matrix(body, status, field):
    http, backend = client()
    response = http.post("/v1/generate", content=json.dumps(body),  # \ud800 escapes as JSON allows
                         headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    detail = strict_json(response)["detail"]
    if field is not None:
        assert field in {str(part) for item in detail for part in item["loc"]}
    if status == 409:
        assert "edit_step 5" in detail and "saved: [2, 4, 6]" in detail
    assert not backend.jobs


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
NUMBER_FIELDS = ["alpha", "guidance_scale", "seed", "num_images", "num_inference_steps", "guidance_steps",
                 "guidance_step", "edit_step"]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("field", NUMBER_FIELDS + ["prompt", "negative_prompt", "response_format", "extra"])
def test_non_finite_numbers_are_a_422_naming_the_field(field, value):
    """Python's JSON reader takes NaN, Infinity and 1e400 (-> inf); the answer is a 422 naming the
    field, itself standard JSON: the offending value is never echoed back."""
    http, backend = client()
    fields = '"prompt": "a sks dog"' if field == "prompt" else f'"prompt": "a sks dog", "{field}": {value}'
    raw = ('{"subject_id": "dog", ' + fields + (f', "prompt": {value}' if field == "prompt" else "") + "}")
    raw = raw.replace('"prompt": "a sks dog", "prompt"', '"prompt"')
    response = http.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, (raw, response.status_code, response.text)
    detail = strict_json(response)["detail"]
    assert field in {str(part) for item in detail for part in item["loc"]}, detail
    assert all(set(item) == {"loc", "msg", "type"} for item in detail)  # no "input" echo
    assert not backend.jobs


@pytest.mark.parametrize("raw,field", [
    ('{"subject_id": "dog", "prompts": ["a", NaN]}', "prompts"),
    ('{"subject_id": NaN, "prompt": "a"}', "subject_id"),
    ('{"subject_id": "dog", "prompt": "a", "alpha": [Infinity, NaN]}', "alpha"),
    ('{"subject_id": "dog", "prompt": "a", "\\ud800": NaN}', None),
    ('[NaN]', None),
    ('NaN', None),
])
def test_no_request_body_makes_the_error_answer_fail(raw, field):
    http, _ = client()
    response = http.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    detail = strict_json(response)["detail"]
    if field is not None:
        assert field in {str(part) for item in detail for part in item["loc"]}


def test_body_too_large_not_json_and_not_utf8():
    http, _ = client()
    response = http.post("/v1/generate", json={"subject_id": "dog", "prompt": "x" * 2000})
    assert response.status_code == 413
    chunks = iter([b'{"subject_id": "dog", ', b'"prompt": "' + b"x" * 1500 + b'"}'])
    response = http.post("/v1/generate", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413  # streamed without Content-Length: counted as it arrives
    response = http.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON decode error" in response.json()["detail"][0]["msg"]
    response = http.post("/v1/generate", content=b'{"subject_id": "\xff"}',
                         headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json() == {"detail": "There was an error parsing the body"}


@pytest.mark.parametrize("error,status", [(serving.Overloaded("queue full at replica 7f3a"), 503),
                                          (serving.DeadlineExceeded("late"), 504),
                                          (serving.SubjectNotFound("subject 'dog' not found"), 404),
                                          (serving.SubjectUnusable("subject 'dog' is damaged"), 424),
                                          (SubjectConflict("subject_id", "another base"), 409),
                                          (FieldError("num_images", "too many"), 422),
                                          (StorageError("GET s3://bucket/secret/subjects/dog failed"), 503),
                                          (RuntimeError("CUDA error at /opt/secret/kernel.cu"), 500)])
def test_backend_errors_map_to_statuses(error, status):
    http, _ = client(RecordingBackend(error))
    response = http.post("/v1/generate", json={"subject_id": "dog", "prompt": "x"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    if status == 503:
        assert response.headers["retry-after"]
    assert "secret" not in response.text and "7f3a" not in response.text  # nothing internal in the answer
    if status == 500:
        assert response.json() == {"detail": "internal error"}


def test_a_lost_replica_asks_for_a_longer_wait_than_a_full_queue():
    from dreamblend_ray.serving.http import REPLICA_RETRY_AFTER_S

    lost, _ = client(RecordingBackend(serving.ReplicaUnavailable("replica 7f3a died twice")))
    response = lost.post("/v1/generate", json={"subject_id": "dog", "prompt": "x"})
    assert response.status_code == 503 and "being replaced" in response.json()["detail"]
    assert int(response.headers["retry-after"]) == REPLICA_RETRY_AFTER_S > 1
    full, _ = client(RecordingBackend(serving.Overloaded("queue full")))
    assert full.post("/v1/generate", json={"subject_id": "dog", "prompt": "x"}).headers["retry-after"] == "1"


def test_subject_is_a_public_view_without_paths_or_versions():
    http, _ = client()
    body = http.get("/v1/subjects/dog").json()
    assert body == {"subject_id": "dog", "class_noun": "dog", "token": "sks", "instance_prompt": "a sks dog",
                    "kind": "lora", "steps": [2, 4, 6], "guidance_step": 2, "edit_step": 6,
                    "base": {"name": "tiny-sd", "config_id": "ab" * 6}, "created_at": "2026-12-02T00:00:00Z",
                    "status": "ready", "progress": None, "queue_position": None, "started_at": None,
                    "finished_at": None, "error": None}
    assert http.get("/v1/subjects/cat").status_code == 404


def _store_with(tmp_path, text: str | bytes):
    from functools import partial

    from dreamblend_ray.training import layout

    path = tmp_path / "subjects" / "dog" / "subject.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = AppArgs(base="tiny", manifest_cache_s=0)
    backend = RecordingBackend()
    root = str(tmp_path)
    return TestClient(http.make_api(args, backend, serving.per_tenant(layout.read_manifest, root),
                                    serving.per_tenant(layout.list_subject_ids, root), serving.per_tenant(serving.read_collapse_plot, root)),
                      raise_server_exceptions=False), backend


@pytest.mark.parametrize("content", ["{not json", json.dumps({**MANIFEST, "subject_id": "cat"}),
                                     json.dumps({**MANIFEST, "steps": "2,4"}), b"\xff\xfe{}"])
def test_a_damaged_subject_is_a_424_naming_the_subject_not_the_path(tmp_path, content):
    http, backend = _store_with(tmp_path, content)
    for response in (http.get("/v1/subjects/dog"),
                     http.post("/v1/generate", json={"subject_id": "dog", "prompt": "a sks dog"})):
        assert response.status_code == 424, response.text
        detail = response.json()["detail"]
        assert "'dog'" in detail and "damaged" in detail
        assert str(tmp_path) not in response.text and "subject.json" not in response.text
    assert not backend.jobs


def test_the_real_store_serves_a_valid_subject(tmp_path):
    http, backend = _store_with(tmp_path, json.dumps(MANIFEST))
    assert http.get("/v1/subjects/dog").json()["steps"] == [2, 4, 6]
    assert http.post("/v1/generate", json={"subject_id": "dog", "prompt": "a sks dog"}).status_code == 200


def test_replica_load_errors_are_named_without_paths():
    """What the model replica raises when a pair does not load (serve_app.LoadedPair.ensure)."""
    from dreamblend_ray.training.layout import ManifestError

    damaged = serving.subject_load_error("dog", ManifestError("/srv/store/subjects/dog/subject.json: bad"))
    assert isinstance(damaged, serving.SubjectUnusable) and "/srv" not in str(damaged)
    from dreamblend_ray.training.layout import PairConflict

    other = serving.subject_load_error("dog", PairConflict("subject 'dog' was fine-tuned from base 'sd15'"))
    assert isinstance(other, SubjectConflict) and "sd15" in other.message  # a known conflict keeps its sentence
    assert pickle.loads(pickle.dumps(other)).message == other.message  # crosses Ray as a value
    corrupt = ValueError("s3://bucket/private/subjects/dog/checkpoints/step-4/pytorch_lora_weights.safetensors "
                         "is not a valid safetensors file: HeaderTooLarge")
    unknown = serving.subject_load_error("dog", corrupt)  # anything else: 424, a fixed sentence
    assert isinstance(unknown, serving.SubjectUnusable) and "s3://" not in str(unknown)
    assert "HeaderTooLarge" not in str(unknown) and "'dog'" in str(unknown)


def test_base_mismatch_message_names_bases_without_their_paths(tiny_components):
    from dreamblend_ray.training import checkpoints

    manifest = {"subject_id": "dog", "base": {"source": "s3://models-bucket/private/sd-1-5/",
                                              "config_sha256": "0" * 64}}
    with pytest.raises(ValueError, match="fine-tuned from base 'sd-1-5'") as info:
        checkpoints._check_base(manifest, tiny_components)
    assert "models-bucket" not in str(info.value) and "private" not in str(info.value)


@pytest.mark.parametrize("tail", ["%0A", "%0D", "%00", "%0D%0A"])
def test_ids_with_control_tails_are_refused_everywhere(tail):
    http, backend = client()
    response = http.get(f"/v1/subjects/dog{tail}")
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["path", "subject_id"]
    raw_id = {"%0A": "\n", "%0D": "\r", "%00": "\x00", "%0D%0A": "\r\n"}[tail]
    response = http.post("/v1/generate", json={"subject_id": "dog" + raw_id, "prompt": "x"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "subject_id"]
    assert not backend.jobs


def test_auth_on(monkeypatch):
    monkeypatch.setenv("DB_TEST_KEY", STRONG_KEY)
    http, _ = client(auth_enabled=True, api_key_env="DB_TEST_KEY")
    body = {"subject_id": "dog", "prompt": "x"}
    assert http.post("/v1/generate", json=body).status_code == 401
    assert http.post("/v1/generate", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    assert http.post("/v1/generate", content=b"{not json").status_code == 401  # the key is checked first
    assert http.get("/v1/subjects/dog").status_code == 401
    assert http.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {STRONG_KEY}"}).status_code == 200
    assert http.get("/v1/subjects/dog", headers=KEY_HEADERS).json()["subject_id"] == "dog"
    for path in ("/healthz", "/healthz?deep=false", "/docs", "/redoc", "/openapi.json",
                 "/static-offline-docs/swagger-ui.css"):
        assert http.get(path).status_code == 200, path  # probes and docs stay open


@pytest.mark.parametrize("query", ["deep=true", "deep=1", "deep=yes", "deep=on", "deep=True", "deep=false&deep=true"])
def test_deep_health_needs_the_key_when_auth_is_on(monkeypatch, query):
    monkeypatch.setenv("DB_TEST_KEY", STRONG_KEY)
    http, _ = client(auth_enabled=True, api_key_env="DB_TEST_KEY")
    response = http.get(f"/healthz?{query}")
    assert response.status_code == 401 and "dog" not in response.text
    response = http.get(f"/healthz?{query}", headers=KEY_HEADERS)
    assert response.status_code == 200 and response.json()["model"]["loaded_models"] == ["dog"]
    assert http.get("/healthz").json() == {"status": "ok", "model": None}


def test_health_and_schema_without_auth():
    http, _ = client()
    assert http.get("/healthz?deep=true").json()["model"]["replica"] == "r1"
    assert http.get("/healthz?deep=maybe").status_code == 422
    schema = http.get("/openapi.json").json()
    assert "/v1/generate" in schema["paths"] and "GenerateRequest" in schema["components"]["schemas"]
    assert "securitySchemes" not in schema.get("components", {})
    assert "401" not in schema["paths"]["/v1/generate"]["post"]["responses"]


def test_deep_health_is_a_503_when_the_model_does_not_answer():
    class DeadModel(RecordingBackend):
        async def model_health(self):
            raise RuntimeError("ActorDiedError: replica at 10.0.0.7 died")

    http, _ = client(DeadModel())
    response = http.get("/healthz?deep=true")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json() == {"detail": "the model replica did not answer"}
    assert http.get("/healthz").status_code == 200
