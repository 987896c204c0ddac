"""Metrics on tiny random CLIP and ViT models built from configs: values agree with hand computation."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dreamblend_ray.evaluation import protocol as benchmark

from dreamblend_ray.evaluation import metrics



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return metrics.save_tiny_clip(root / "clip"), metrics.save_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def clip(model_dirs):
    return metrics.load_clip(str(model_dirs[0]))


@pytest.fixture(scope="module")
def dino(model_dirs):
    return metrics.load_dino(str(model_dirs[1]))


def random_images(count, seed=0, size=(40, 36)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


# ------------------------------------------------------------------ pure maths

def test_cosine_matrix_and_pairwise_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(metrics.cosine_matrix(a, a), torch.eye(2))
    assert metrics.mean_pairwise_distance(a) == pytest.approx(1.0)
    assert metrics.mean_pairwise_distance(torch.ones(3, 4)) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(metrics.mean_pairwise_distance(torch.ones(1, 4)))


# ------------------------------------------------------------------ the metrics

def test_image_against_itself_scores_one(clip, dino):
    image = random_images(1)
    assert metrics.clip_i(clip, image, image) == pytest.approx(1.0, abs=1e-5)
    assert metrics.dino(dino, image, image) == pytest.approx(1.0, abs=1e-5)


def test_clip_i_and_dino_are_mean_over_all_pairs(clip, dino):
    generated, real = random_images(2, seed=1), random_images(3, seed=2)
    for scorer, fn in ((clip, metrics.clip_i), (dino, metrics.dino)):
        g, r = scorer.image_embeddings(generated), scorer.image_embeddings(real)
        expected = np.mean([float(torch.dot(g[i], r[j])) for i in range(2) for j in range(3)])
        assert fn(scorer, generated, real) == pytest.approx(expected, abs=1e-5)
        assert -1.0 <= fn(scorer, generated, real) <= 1.0


def test_clip_t_equals_hand_computed_cosine(clip):
    images, prompts = random_images(2, seed=3), ["a dog on the beach", "a toy in the snow"]
    with torch.no_grad():
        pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
        image_out = clip.model.get_image_features(pixel_values=pixels)
        tokens = clip.tokenizer(prompts, padding=True, return_tensors="pt")
        text_out = clip.model.get_text_features(input_ids=tokens["input_ids"],
                                                attention_mask=tokens["attention_mask"])
    img = getattr(image_out, "pooler_output", image_out)
    txt = getattr(text_out, "pooler_output", text_out)
    expected = [float(torch.dot(img[i], txt[i]) / (img[i].norm() * txt[i].norm())) for i in range(2)]
    assert metrics.clip_t_per_image(clip, images, prompts) == pytest.approx(expected, abs=1e-5)
    assert metrics.clip_t(clip, images, prompts) == pytest.approx(np.mean(expected), abs=1e-5)


def test_preprocessing_is_the_models_own_pil_processor(clip, dino):
    # No torchvision: the PIL backends are used, and they resize any input to the model size.
    assert type(clip.processor).__name__.endswith("Pil")
    assert type(dino.processor).__name__.endswith("Pil")
    assert clip.image_embeddings(random_images(1, size=(64, 20))).shape == (1, 16)


def test_diversity(dino):
    image = random_images(1, seed=4)[0]
    assert metrics.diversity(dino, [image, image.copy(), image.copy()]) == pytest.approx(0.0, abs=1e-6)
    varied = random_images(3, seed=5) + [Image.new("RGB", (32, 32), "white")]
    emb = dino.image_embeddings(varied)
    expected = np.mean([1 - float(torch.dot(emb[i], emb[j])) for i in range(4) for j in range(i + 1, 4)])
    assert metrics.diversity(dino, varied) == pytest.approx(expected, abs=1e-5)
    assert metrics.diversity(dino, varied) > 0


def test_clip_dino_scorer(clip, dino):
    real = random_images(2, seed=6)
    scorer = metrics.ClipDinoScorer(clip, dino, real)
    scores = scorer(real[:1], ["a toy"])
    assert scores["prompt_fidelity"] == pytest.approx(metrics.clip_t(clip, real[:1], ["a toy"]), abs=1e-5)
    assert scores["subject_fidelity"] == pytest.approx(metrics.dino(dino, real[:1], real), abs=1e-5)


def test_bad_inputs(clip):
    with pytest.raises(ValueError, match="prompts"):
        metrics.clip_t_per_image(clip, random_images(2), ["only one"])
    with pytest.raises(ValueError, match="at least one image"):
        metrics.clip_i(clip, [], random_images(1))


# ------------------------------------------------------------------ loading

@pytest.mark.parametrize("loader, option", [(metrics.load_clip, "--clip-model"), (metrics.load_dino, "--dino-model")])
def test_missing_model_path_names_the_option(tmp_path, loader, option):
    with pytest.raises(ValueError, match=option):
        loader(None)
    with pytest.raises(ValueError, match=f"{option}.*not a directory"):
        loader(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=f"{option}.*config.json"):
        loader(str(tmp_path))


def test_load_from_s3(s3_bucket, model_dirs, tmp_path, monkeypatch):
    from dreamblend_ray.io import storage

    monkeypatch.setenv("DREAMBLEND_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/dino"
    storage.upload_dir(model_dirs[1], uri)
    image = random_images(1)
    assert metrics.dino(metrics.load_dino(uri), image, image) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ DreamBooth prompts and subjects

def test_dreambooth_prompt_templates():
    for kind in ("object", "live"):
        templates = benchmark.templates(kind)
        assert len(templates) == len(set(templates)) == 25
        assert all("{token} {class_noun}" in t for t in templates)
    assert "a {token} {class_noun} wearing a santa hat" in benchmark.templates("live")
    assert "a {token} {class_noun} floating in an ocean of milk" in benchmark.templates("object")
    subjects = benchmark.prompt_data()["subjects"]
    assert len(subjects) == 30 and sum(s["kind"] == "live" for s in subjects) == 9
    prompts, plain = benchmark.prompts_for("object", "backpack", "sks", limit=3)
    assert prompts[0] == "a sks backpack in the jungle" and plain[0] == "a backpack in the jungle"
    assert len(prompts) == len(plain) == 3
    assert all("sks" not in p for p in benchmark.prompts_for("live", "dog", "sks")[1])


def test_subject_list_roundtrip_and_validation(tmp_path):
    subjects = [benchmark.EvalSubject("dog", "dog", "live", str(tmp_path / "dog")),
                benchmark.EvalSubject("can-1", "can", "object", "s3://b/can")]
    uri = str(tmp_path / "subjects.jsonl")
    benchmark.write_subjects(uri, subjects)
    assert benchmark.read_subjects(uri) == subjects
    alias = json.dumps({"subject_id": "x", "class_noun": "toy", "kind": "object", "image_dir": "/d"})
    assert benchmark.parse_subjects(alias)[0].id == "x"
    bad = {
        "kind must be one of": {"id": "x", "class_noun": "toy", "kind": "animal", "image_dir": "/d"},
        "missing": {"id": "x", "class_noun": "toy"},
        "subject_id must match": {"id": "a/b", "class_noun": "toy", "kind": "object", "image_dir": "/d"},
        "unknown keys": {"id": "x", "class_noun": "toy", "kind": "object", "image_dir": "/d", "colour": 1},
    }
    for message, row in bad.items():
        with pytest.raises(ValueError, match=f"line 2: .*{message}"):
            benchmark.parse_subjects(alias + "\n" + json.dumps(row))
    with pytest.raises(ValueError, match="duplicate"):
        benchmark.parse_subjects(alias + "\n" + alias)
    with pytest.raises(ValueError, match="no subjects"):
        benchmark.parse_subjects("\n")


def test_load_images(tmp_path):
    for i, image in enumerate(random_images(2)):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert len(benchmark.load_images(str(tmp_path))) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        benchmark.load_images(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="absent holds no"):
        benchmark.load_images(str(tmp_path / "absent"))
