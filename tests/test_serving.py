"""The serving logic without Ray: request validation, limits, model ids, grouping, auth, HTTP errors.

The HTTP layer runs in-process (FastAPI's TestClient) over a recording backend; the real Ray
deployments and the real sampler are exercised end to end in test_serve.py.
"""

import asyncio
import base64
import io
import pickle

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dreamblend_ray import serving
from dreamblend_ray.serving import (AppArgs, FieldError, GenerateRequest, GenerationJob, GenerationResult,
                                    SamplingSettings)

MANIFEST = {"subject_id": "dog", "steps": [2, 4, 6], "guidance_step": 2, "edit_step": 6}


def png(color=(255, 0, 0)) -> bytes:
    return serving.encode_png(Image.new("RGB", (8, 8), color))


class RecordingBackend:
    def __init__(self, error: Exception | None = None):
        self.jobs: list[GenerationJob] = []
        self.error = error

    async def generate(self, job):
        self.jobs.append(job)
        if self.error is not None:
            raise self.error
        return GenerationResult(pngs=[png() for _ in job.prompts], seeds=job.seeds, batch_requests=1,
                                batch_images=len(job.prompts), replica="r1", loaded_models=[job.model_id])

    async def model_health(self):
        return {"replica": "r1", "loaded_models": []}


def read_manifest(subject_id):
    if subject_id != "dog":
        raise FileNotFoundError(subject_id)
    return MANIFEST


def client(backend=None, **overrides) -> tuple[TestClient, RecordingBackend]:
    backend = backend or RecordingBackend()
    args = AppArgs(**{"base": "tiny", "max_body_bytes": 1024, **overrides})
    return TestClient(serving.make_api(args, backend, read_manifest)), backend


# ------------------------------------------------------------------------------ pure functions

def test_model_id_round_trip_and_rejects_garbage():
    for g, e, text in [(None, None, "dog"), (2, None, "dog@g2"), (None, 6, "dog@e6"), (2, 6, "dog@g2,e6")]:
        assert serving.model_id_for("dog", g, e) == text
        assert serving.parse_model_id(text) == ("dog", g, e)
    for bad in ("", "d/og", "dog@", "dog@x3", "dog@g", "dog@g1,g2", "dog@g-1"):
        with pytest.raises(ValueError):
            serving.parse_model_id(bad)


def test_build_job_one_seed_per_image_and_defaults():
    args = AppArgs(base="tiny", default_steps=7, max_images_per_request=8)
    request = GenerateRequest(subject_id="dog", prompts=["a", "b"], num_images=3, negative_prompt="blur")
    job = serving.build_job(request, args, seed=10, now=100.0)
    assert job.prompts == ["a", "a", "a", "b", "b", "b"]
    assert job.seeds == [10, 11, 12, 13, 14, 15]
    assert job.negative_prompts == ["blur"] * 6
    assert job.settings == SamplingSettings(7, args.default_guidance_scale, args.default_alpha, None)
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
        serving.sampling_settings(GenerateRequest(subject_id="dog", prompt="x", num_inference_steps=5,
                                                  guidance_steps=6), args)
    assert info.value.field == "guidance_steps"


def test_field_error_survives_pickling():
    error = pickle.loads(pickle.dumps(FieldError("num_images", "too many")))
    assert (error.field, error.message) == ("num_images", "too many")


def test_overrides_checked_and_canonical():
    request = GenerateRequest(subject_id="dog", prompt="x", guidance_step=2, edit_step=4)
    canonical = serving.canonical_overrides(request, MANIFEST)
    assert (canonical.guidance_step, canonical.edit_step) == (None, 4)  # 2 is the default G
    with pytest.raises(FieldError) as info:
        serving.canonical_overrides(GenerateRequest(subject_id="dog", prompt="x", edit_step=5), MANIFEST)
    assert info.value.field == "edit_step"


def test_group_jobs_by_model_and_settings():
    s1, s2 = SamplingSettings(4, 3.0, 0.2, None), SamplingSettings(5, 3.0, 0.2, None)
    jobs = [GenerationJob("a", ["p"], [1], s1), GenerationJob("b", ["p"], [1], s1),
            GenerationJob("a", ["p"], [2], s1, negative_prompts=["n"]), GenerationJob("a", ["p"], [3], s2)]
    assert serving.group_jobs(jobs) == [[0, 2], [1], [3]]
    assert serving.take_group(jobs, 8) == [0, 2] and serving.take_group(jobs, 1) == [0]
    assert serving.take_group(jobs[1:], 8) == [0] and serving.take_group([], 8) == []


class FakeSampler:
    """Records the call; image colour encodes the seed so that the split can be checked."""

    def __init__(self):
        self.calls = []

    def sample(self, pair, prompts, seeds, config, negative_prompts=None, callback=None):
        import torch

        self.calls.append((list(prompts), list(seeds), negative_prompts, config))
        images = [Image.new("RGB", (4, 4), (s % 256, 0, 0)) for s in seeds]
        return type("R", (), {"images": images, "attention_distance": torch.ones(len(seeds), 2) * 2,
                              "seconds": 0.5})()


def test_run_group_one_call_and_split_back():
    settings = SamplingSettings(4, 3.0, 0.2, 2)
    jobs = [GenerationJob("a", ["p", "p"], [5, 6], settings), GenerationJob("a", ["q"], [9], settings, ["n"])]
    sampler = FakeSampler()
    outputs = serving.run_group(sampler, object(), jobs)
    assert len(sampler.calls) == 1
    prompts, seeds, negatives, config = sampler.calls[0]
    assert (prompts, seeds, negatives) == (["p", "p", "q"], [5, 6, 9], ["", "", "n"])
    assert config.guidance_steps == 2 and config.num_inference_steps == 4
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

    def read(subject_id):
        reads.append(subject_id)
        return read_manifest(subject_id)

    now = [0.0]
    cache = serving.ManifestCache(read, ttl_s=5, clock=lambda: now[0])
    asyncio.run(cache.get("dog"))
    asyncio.run(cache.get("dog"))
    now[0] = 6.0
    asyncio.run(cache.get("dog"))
    assert reads == ["dog", "dog"]
    with pytest.raises(serving.SubjectNotFound):
        asyncio.run(cache.get("cat"))


# ------------------------------------------------------------------------------ HTTP, in process

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
    ({"subject_id": "dog", "prompts": ["x"] * 9}, 422, "prompts"),
    ({"subject_id": "dog", "prompt": "x", "alpha": -1}, 422, "alpha"),
    ({"subject_id": "dog", "prompt": "x", "guidance_scale": "high"}, 422, "guidance_scale"),
    ({"subject_id": "dog", "prompt": "x", "seed": -5}, 422, "seed"),
    ({"subject_id": "dog", "prompt": "x", "num_inference_steps": 4, "guidance_steps": 9}, 422, "guidance_steps"),
    ({"subject_id": "dog", "prompt": "x", "edit_step": 5}, 422, "edit_step"),
    ({"subject_id": "dog", "prompt": "x", "response_format": "gif"}, 422, "response_format"),
    ({"subject_id": "dog", "prompt": "x", "colour": "red"}, 422, "colour"),
])
def test_bad_input_matrix(body, status, field):
    http, backend = client()
    response = http.post("/v1/generate", json=body)
    assert response.status_code == status, response.text
    if field is not None:
        assert field in {str(part) for item in response.json()["detail"] for part in item["loc"]}
    assert not backend.jobs


def test_body_too_large_and_not_json():
    http, _ = client()
    response = http.post("/v1/generate", json={"subject_id": "dog", "prompt": "x" * 2000})
    assert response.status_code == 413
    chunks = iter([b'{"subject_id": "dog", ', b'"prompt": "' + b"x" * 1500 + b'"}'])
    response = http.post("/v1/generate", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413  # streamed without Content-Length: counted as it arrives
    response = http.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize("error,status", [(serving.Overloaded("full"), 503),
                                          (serving.DeadlineExceeded("late"), 504),
                                          (serving.SubjectNotFound("gone"), 404),
                                          (FieldError("subject_id", "other base"), 422)])
def test_backend_errors_map_to_statuses(error, status):
    http, _ = client(RecordingBackend(error))
    response = http.post("/v1/generate", json={"subject_id": "dog", "prompt": "x"})
    assert response.status_code == status
    if status == 503:
        assert response.headers["retry-after"]


def test_auth_on(monkeypatch):
    monkeypatch.setenv("DB_TEST_KEY", "s3cret")
    http, _ = client(auth_enabled=True, api_key_env="DB_TEST_KEY")
    body = {"subject_id": "dog", "prompt": "x"}
    assert http.post("/v1/generate", json=body).status_code == 401
    assert http.post("/v1/generate", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    assert http.get("/v1/subjects/dog").status_code == 401
    assert http.post("/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert http.get("/v1/subjects/dog", headers={"X-API-Key": "s3cret"}).json() == MANIFEST
    assert http.get("/healthz").status_code == 200  # probes stay open
    assert http.get("/docs").status_code == 200


def test_subject_manifest_and_health_and_docs():
    http, _ = client()
    assert http.get("/v1/subjects/dog").json() == MANIFEST
    assert http.get("/v1/subjects/cat").status_code == 404
    assert http.get("/healthz?deep=true").json()["model"]["replica"] == "r1"
    schema = http.get("/openapi.json").json()
    assert "/v1/generate" in schema["paths"] and "GenerateRequest" in schema["components"]["schemas"]
