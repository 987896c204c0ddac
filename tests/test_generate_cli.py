"""`dreamblend generate` end to end on the tiny model: a subject root or two checkpoint URIs."""

import json

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.training import layout
from dreamblend_ray.cli import main
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.training.finetune import finetune_subject

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster under load


@pytest.fixture(scope="module")
def subject_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    config = FinetuneConfig(steps=4, checkpoint_steps=(2, 4), num_class_images=0,
                            prior_preservation=False, learning_rate=1e-3)
    finetune_subject("tiny", images, "dog", "rex", str(root), config, progress=False)
    return str(root)


def _run(*argv):
    return main(["--log-level", "WARNING", "generate", "--base", "tiny", "--steps", "4", *argv])


def test_generate_from_subject_writes_pngs_and_sidecar(subject_root, tmp_path):
    out = tmp_path / "out"
    rc = _run("--subject-root", subject_root, "--subject-id", "rex", "--prompt", "a photo of sks dog",
              "--prompt", "a dog on the beach", "--num-images", "2", "--seed", "5", "--alpha", "0.3",
              "--reference", "--out", str(out))
    assert rc == 0
    sidecar = json.loads((out / "settings.json").read_text())
    assert [r["seed"] for r in sidecar["images"]] == [5, 6, 5, 6]
    assert sidecar["settings"]["alpha"] == 0.3 and sidecar["pair"]["subject_id"] == "rex"
    for record in sidecar["images"]:
        assert Image.open(out / record["image"]).size == (32, 32)
        assert (out / record["reference_image"]).is_file()
        assert record["mean_attention_distance"] >= 0


def test_generate_from_checkpoint_uris_matches_subject_pair(subject_root, tmp_path):
    common = ["--prompt", "a photo of sks dog", "--seed", "3", "--alpha", "0.4"]
    assert _run("--subject-root", subject_root, "--subject-id", "rex", "--guidance-step", "2",
                "--edit-step", "4", *common, "--out", str(tmp_path / "a")) == 0
    assert _run("--guidance-ckpt", layout.checkpoint_uri(subject_root, "rex", 2),
                "--edit-ckpt", layout.checkpoint_uri(subject_root, "rex", 4),
                *common, "--out", str(tmp_path / "b")) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "0000.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "b" / "0000.png"), dtype=int)
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("argv", [
    ["--subject-root", "x", "--guidance-ckpt", "y"],
    ["--subject-root", "x"],
    ["--guidance-ckpt", "y"],
    ["--alpha", "-1", "--subject-root", "x", "--subject-id", "rex"],
    ["--num-images", "0", "--subject-root", "x", "--subject-id", "rex"],
])
def test_bad_arguments_exit_2(argv, tmp_path):
    assert _run(*argv, "--prompt", "a dog", "--out", str(tmp_path)) == 2


def test_missing_checkpoint_is_a_clear_error(tmp_path, caplog):
    assert _run("--guidance-ckpt", str(tmp_path / "nope"), "--edit-ckpt", str(tmp_path / "nope"),
                "--prompt", "a dog", "--out", str(tmp_path / "o")) == 2
    assert "checkpoint directory" in caplog.text
