"""docs/playground_screenshot.py without a browser or the embedded model: its arguments, and its
backend behind the real app (a tiny-model pair standing in for the subject's checkpoints) turning the
playground's request into the generation the script expects."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from dreamblend_ray.method.pair import TwoUNetPair
from dreamblend_ray.training import layout

from api_fakes import MANIFEST

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "playground_screenshot.py"
KEY = "screenshot-test-k3y-0a1b2c3d4e5f6a7b8c9d"


@pytest.fixture(scope="module")
def shot():
    spec = importlib.util.spec_from_file_location("playground_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_demo_storage_the_docs_image_and_the_documented_settings(shot):
    args = shot.parse_args([])
    assert (args.storage, args.out, args.subject) == ("outputs/demo/storage", "docs/img/playground.png", "half-ring")
    assert (args.seed, args.steps, args.window, args.alpha, args.scale) == (0, 30, 18, 0.25, 3.0)
    assert args.eta_schedule == "constant"  # the demo's (DemoConfig.eta_schedule)
    assert args.prompt == "a sks shape and a blue square on a black background"
    args = shot.parse_args(["--storage", "/s", "--subject", "striped-star", "--seed", "3", "--window", "9",
                            "--out", "x.png"])
    assert (args.storage, args.subject, args.seed, args.window, args.out) == ("/s", "striped-star", 3, 9, "x.png")
    assert "python docs/playground_screenshot.py --storage outputs/demo/storage" in shot.__doc__


@pytest.fixture
def one_thread():
    """One torch thread, as the script (with conftest's two, beside a busy benchmark, this test once
    took 24 s, not 0.6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def page_body(args) -> dict:
    """What playground.js's requestBody sends for the form as the script fills it (default G/E steps)."""
    return {"subject_id": args.subject, "prompt": args.prompt, "attention_maps": True, "response_format": "json",
            "seed": args.seed, "num_inference_steps": args.steps, "guidance_steps": args.window,
            "alpha": args.alpha, "eta_schedule": args.eta_schedule, "guidance_scale": args.scale,
            "guidance_step": 2, "edit_step": 6}


def test_the_backend_turns_the_pages_request_into_the_expected_generation(shot, tmp_path, monkeypatch,
                                                                          tiny_components, one_thread):
    root = str(tmp_path)
    manifest = {**MANIFEST, "subject_id": "half-ring", "class_noun": "shape", "token": "sks"}
    Path(layout.manifest_uri(root, "half-ring")).parent.mkdir(parents=True)
    Path(layout.manifest_uri(root, "half-ring")).write_text(json.dumps(manifest))
    loads = []

    def load_pair(*call):
        loads.append(call)
        return TwoUNetPair(tiny_components.unet, tiny_components.unet), manifest

    backend = shot.SamplerBackend(tiny_components, root, load_pair=load_pair)
    monkeypatch.setenv(shot.KEY_ENV, KEY)
    client = TestClient(shot.make_app(root, backend))
    args = shot.parse_args(["--storage", root, "--steps", "3", "--window", "2"])
    answer = client.post("/v1/generate", json=page_body(args), headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    shot.check_job(backend, args)  # raises unless the job is what the script asked the page for
    assert loads == [(root, "half-ring", tiny_components, None, None)]  # the default pair: the manifest's
    (entry,) = answer.json()["attention"]
    assert entry["words"] == args.prompt.split() and set(entry["maps"]) == {"guidance", "edit", "dreamblend"}
    assert len(entry["attention_distance_steps"]) == 2  # the window K
    status = client.get("/v1/status", headers={"X-API-Key": KEY}).json()
    assert status["recent_steps"] == 3 and status["loaded_subjects"] == ["half-ring"], status
    with pytest.raises(ValueError, match="expected"):
        shot.check_job(backend, shot.parse_args(["--seed", "2", "--steps", "3", "--window", "2"]))
    with pytest.raises(ValueError, match="expected"):  # the step size the page sent is checked too
        shot.check_job(backend, shot.parse_args(["--steps", "3", "--window", "2", "--eta-schedule", "linear"]))
