"""Issue 19 over HTTP: attention maps on POST /v1/generate, the subjects listing, collapse.png.

The HTTP tests run in-process over the fakes of api_fakes.py; one test runs the replica's real
``batching.run_group`` on the tiny model to check that a job's maps and images do not depend on
the jobs it shares the sampler call with.
"""

import base64
import copy
import io

import jsonschema
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.serving import batching
from dreamblend_ray.serving import requests as serving
from dreamblend_ray.serving.batching import ATTENTION_KEYS, GenerationJob
from dreamblend_ray.serving.requests import AppArgs, FieldError, GenerateRequest

from api_fakes import MAP_SIZE, SUBJECT_IDS, make_app  # the tests' fakes (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster under load

KEY = "attention-k3y-1a3c5e7a9c1e3a5c7e9a"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def http():
    return TestClient(make_app(), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def secured():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DB_ATTENTION_KEY", KEY)
        yield TestClient(make_app(auth_enabled=True, api_key_env="DB_ATTENTION_KEY"), raise_server_exceptions=False)


def generate(http, **fields):
    return http.post("/v1/generate", json={"subject_id": "dog", "seed": 3, **fields})


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------ POST /v1/generate


def test_attention_maps_answer_json_with_one_entry_per_image(http):
    response = generate(http, prompts=["a sks dog", "a sks dog on grass"], num_images=2, attention_maps=True)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert len(body["images"]) == len(body["attention"]) == 4
    for prompt, entry in zip(body["prompts"], body["attention"]):
        assert tuple(entry) == ATTENTION_KEYS
        assert entry["words"] == prompt.split() and entry["rows"] == ["guidance", "edit", "dreamblend"]
        assert entry["map_size"] == list(MAP_SIZE) and set(entry["maps"]) == set(entry["rows"])
        for maps in entry["maps"].values():
            assert np.asarray(maps).shape == (len(entry["words"]), *MAP_SIZE)
        assert set(entry["images"]) == {"guidance", "edit"}
        assert png_pixels(base64.b64decode(entry["images"]["edit"])).shape == (8, 8, 3)


def test_one_image_with_attention_maps_is_json_not_png(http):
    response = generate(http, prompt="a sks dog", attention_maps=True)
    assert response.headers["content-type"] == "application/json"
    assert len(response.json()["attention"]) == 1
    plain = generate(http, prompt="a sks dog", response_format="json")
    assert plain.json()["attention"] is None  # the key is there, null, when maps were not asked for


def test_png_with_attention_maps_is_a_422_naming_response_format(http):
    response = generate(http, prompt="a sks dog", attention_maps=True, response_format="png")
    assert response.status_code == 422
    assert [issue["loc"] for issue in response.json()["detail"]] == [["body", "response_format"]]


@pytest.mark.parametrize("fields, name", [
    ({"num_inference_steps": 10, "maps_stop": 11}, "maps_stop"),
    ({"num_inference_steps": 10, "maps_start": 4, "maps_stop": 4}, "maps_start"),
    ({"num_inference_steps": 10, "maps_start": 10}, "maps_start"),
    ({"maps_stop": 31}, "maps_stop"),  # > the default step count (30)
    ({"maps_start": 0, "maps_stop": 0}, "maps_stop"),  # below the declared minimum
    ({"attention_maps": 1}, "attention_maps"),  # a JSON boolean, not a number
    ({"attention_maps": "true"}, "attention_maps"),
])
def test_a_bad_maps_range_is_a_422_naming_the_field(http, fields, name):
    response = generate(http, **{"prompt": "a sks dog", "attention_maps": True, **fields})
    assert response.status_code == 422, response.text
    assert [issue["loc"][-1] for issue in response.json()["detail"]] == [name]


def test_the_schema_says_what_the_server_does_about_png_and_the_maps_window(http):
    schema = http.get("/openapi.json").json()
    validator = jsonschema.Draft202012Validator(schema["components"]["schemas"]["GenerateRequest"])
    cases = [{"attention_maps": True, "response_format": "png"}, {"attention_maps": True, "response_format": "auto"},
             {"attention_maps": False, "response_format": "png"}, {"maps_stop": 30}, {"maps_stop": 31},
             {"maps_start": 29}, {"maps_start": 30}, {"maps_start": 29, "maps_stop": 30},
             {"num_inference_steps": 40, "maps_stop": 40}]
    for case in cases:
        body = {"subject_id": "dog", "prompt": "a", "seed": 1, **case}
        assert generate(http, **body).status_code == (200 if validator.is_valid(body) else 422), case
    view = schema["components"]["schemas"]["AttentionView"]
    assert set(view["required"]) == set(ATTENTION_KEYS)


def test_without_attention_maps_the_window_is_checked_then_reset_so_batches_are_not_split():
    args = AppArgs(base="tiny")
    plain = serving.sampling_config(GenerateRequest(subject_id="dog", prompt="x", maps_start=3), args)
    assert plain == serving.sampling_config(GenerateRequest(subject_id="dog", prompt="x"), args)
    with pytest.raises(FieldError, match="maps_stop"):
        serving.sampling_config(GenerateRequest(subject_id="dog", prompt="x", maps_stop=31), args)
    mapped = serving.sampling_config(GenerateRequest(subject_id="dog", prompt="x", attention_maps=True,
                                                     maps_start=3, maps_stop=9), args)
    assert (mapped.attention_maps, mapped.map_steps) == (True, range(3, 9))


# ------------------------------------------------------------------------------ GET /v1/subjects


def test_subjects_page_on_with_after_and_next(http):
    pages, after = [], None
    while True:
        body = http.get("/v1/subjects", params={"limit": 2, **({"after": after} if after else {})}).json()
        pages.append(body["subjects"])
        after = body["next"]
        if after is None:
            break
        assert after == body["subjects"][-1]
    assert pages == [["bird", "dog"], ["eel", "fox"], ["owl"]]
    assert http.get("/v1/subjects").json() == {"subjects": list(SUBJECT_IDS), "next": None}  # default limit 50
    exact = http.get("/v1/subjects", params={"limit": len(SUBJECT_IDS)}).json()
    assert exact == {"subjects": list(SUBJECT_IDS), "next": None}  # no more follow: no next
    assert http.get("/v1/subjects", params={"after": "zzz"}).json() == {"subjects": [], "next": None}


@pytest.mark.parametrize("params, name", [({"after": "../dog"}, "after"), ({"after": "a" * 65}, "after"),
                                          ({"limit": 0}, "limit"), ({"limit": 201}, "limit"),
                                          ({"limit": "many"}, "limit")])
def test_bad_subject_paging_is_a_422_naming_the_parameter(http, params, name):
    response = http.get("/v1/subjects", params=params)
    assert response.status_code == 422
    assert [issue["loc"] for issue in response.json()["detail"]] == [["query", name]]


def test_subjects_and_the_plot_need_the_key(secured):
    for path in ("/v1/subjects", "/v1/subjects/dog/collapse.png"):
        assert secured.get(path).status_code == 401
        assert secured.get(path, headers=AUTH).status_code == 200


def test_a_storage_fault_while_listing_is_a_503_without_the_path():
    from api_fakes import RecordingBackend, read_collapse_plot, read_manifest

    from dreamblend_ray.io.storage import StorageError
    from dreamblend_ray.serving import http as http_api

    def down(after, limit, tenant="default"):
        raise StorageError("list s3://bucket/secret/subjects failed")

    app = http_api.make_api(AppArgs(base="tiny"), RecordingBackend(), read_manifest, down, read_collapse_plot)
    response = TestClient(app, raise_server_exceptions=False).get("/v1/subjects")
    assert response.status_code == 503 and "secret" not in response.text and response.headers["Retry-After"]


# ------------------------------------------------------------------------------ collapse.png


def test_the_collapse_plot_is_a_png_or_a_404_sentence(http):
    response = http.get("/v1/subjects/dog/collapse.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert png_pixels(response.content).shape == (8, 8, 3)
    no_plot = http.get("/v1/subjects/fox/collapse.png")  # a complete subject, probed or not
    assert no_plot.status_code == 404 and "no attention-probe plot" in no_plot.json()["detail"]
    absent = http.get("/v1/subjects/cat/collapse.png")
    assert absent.status_code == 404 and absent.json()["detail"] == "subject 'cat' not found"
    assert http.get("/v1/subjects/a.b/collapse.png").status_code == 422


def test_the_plot_from_a_real_store(tmp_path):
    """The ingress's wiring: layout's listing and collapse_plot_uri through requests.read_collapse_plot."""
    from functools import partial

    from api_fakes import MANIFEST, RecordingBackend, png

    from dreamblend_ray.serving import http as http_api
    from dreamblend_ray.training import layout

    root = str(tmp_path)
    for subject in ("dog", "eel"):
        layout.write_manifest(root, subject, {**MANIFEST, "subject_id": subject})
    (tmp_path / "subjects" / "cat").mkdir()  # an unfinished fine-tune: not listed
    plot = png((1, 2, 3))
    (tmp_path / "subjects" / "dog" / "collapse.png").write_bytes(plot)
    app = http_api.make_api(AppArgs(base="tiny"), RecordingBackend(), serving.per_tenant(layout.read_manifest, root),
                            serving.per_tenant(layout.list_subject_ids, root), serving.per_tenant(serving.read_collapse_plot, root))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/v1/subjects", params={"limit": 1}).json() == {"subjects": ["dog"], "next": "dog"}
    assert client.get("/v1/subjects", params={"after": "dog"}).json() == {"subjects": ["eel"], "next": None}
    assert client.get("/v1/subjects/dog/collapse.png").content == plot
    assert client.get("/v1/subjects/eel/collapse.png").status_code == 404
    assert client.get("/v1/subjects/cat/collapse.png").status_code == 404


# ------------------------------------------------------------------------------ the replica, for real


@pytest.fixture(scope="module")
def tiny_run():
    from dreamblend_ray.method.pair import TwoUNetPair
    from dreamblend_ray.method.sampler import DreamBlendSampler
    from dreamblend_ray.models.components import build_tiny_components

    components = build_tiny_components(0, "tiny")
    g_unet = copy.deepcopy(components.unet)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in g_unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return DreamBlendSampler(components), TwoUNetPair(g_unet, components.unet)


def test_run_group_gives_each_job_its_maps_as_if_served_alone(tiny_run):
    sampler, pair = tiny_run
    config = SamplingConfig(num_inference_steps=4, alpha=0.5, guidance_steps=2, attention_maps=True, maps_start=1)
    first = GenerationJob("dog", ["a sks dog beside a red ball"], [3], config)
    second = GenerationJob("dog", ["a sks dog"], [9], config, negative_prompts=["blur"])
    together = batching.run_group(sampler, pair, [first, second])
    alone = batching.run_group(sampler, pair, [second])[0]
    assert [len(out.attention) for out in together] == [1, 1]
    for prompt, entry in zip(first.prompts, together[0].attention):
        assert entry["words"] == prompt.split()
        assert np.asarray(entry["maps"]["dreamblend"]).shape == (len(entry["words"]), *entry["map_size"])
        assert len(entry["attention_distance_steps"]) == 2  # the guidance window
    batched = together[1]
    got, want = batched.attention[0], alone.attention[0]
    assert got["words"] == want["words"] == ["a", "sks", "dog"] and got["map_size"] == want["map_size"]
    for row in ("guidance", "edit", "dreamblend"):
        np.testing.assert_allclose(got["maps"][row], want["maps"][row], atol=1e-4)
    np.testing.assert_allclose(got["attention_distance_steps"], want["attention_distance_steps"], rtol=1e-4, atol=1e-6)
    pairs = [(batched.pngs[0], alone.pngs[0])] + [
        (base64.b64decode(got["images"][row]), base64.b64decode(want["images"][row])) for row in ("guidance", "edit")]
    for shared, single in pairs:
        assert np.abs(png_pixels(shared) - png_pixels(single)).max() <= 1  # one 8-bit step at most
    # the three trajectories differ: G is another UNet, E unguided is not DreamBlend's E
    assert not np.array_equal(got["maps"]["guidance"], got["maps"]["dreamblend"])
    assert not np.array_equal(got["maps"]["edit"], got["maps"]["dreamblend"])


def test_non_finite_heat_map_values_are_answered_as_numbers_never_a_bare_500():
    """Issue 33: a numerical fault that puts NaN or inf in a trajectory's maps still answers 200
    with JSON numbers (Starlette's JSON refuses NaN: that was an internal error)."""
    from api_fakes import RecordingBackend, list_subjects, read_collapse_plot, read_manifest
    from dreamblend_ray.serving import http as http_api

    class NanMaps(RecordingBackend):
        async def generate(self, job):
            result = await super().generate(job)
            for entry in result.attention:
                entry["maps"] = {row: copy.deepcopy(grid) for row, grid in entry["maps"].items()}  # one grid per row
                entry["maps"]["dreamblend"][0][0][0] = float("nan")
                entry["maps"]["guidance"][0][1][0] = float("inf")
            return result

    app = http_api.make_api(AppArgs(base="tiny"), NanMaps(), read_manifest, list_subjects, read_collapse_plot)
    response = generate(TestClient(app, raise_server_exceptions=False), prompt="a sks dog", attention_maps=True)
    assert response.status_code == 200, response.text
    maps = response.json()["attention"][0]["maps"]
    assert maps["dreamblend"][0][0][0] == 0.0 and maps["guidance"][0][1][0] == 0.0
    assert maps["edit"][0][0][0] > 0  # the finite values are kept
