"""DreamBooth fine-tuning on the tiny model: learning, checkpoint format, determinism, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreamblend_ray.training import checkpoints, layout

from dreamblend_ray.io import storage
from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.training.finetune import finetune_subject, image_uris

FAST = dict(prior_preservation=False, learning_rate=1e-2)


# One thread: tiny training steps gain nothing from two, and CPU results stay bitwise reproducible.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def components():
    """A private tiny model: LoRA training adds and removes adapters on its UNet."""
    return build_tiny_components(seed=0)


def square(i: int, size: int = 32) -> Image.Image:
    a = np.full((size, size, 3), 20, np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 40 + 30 * i, 40)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def images():
    return [square(i) for i in range(3)]


@pytest.fixture
def image_dir(tmp_path, images):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    return folder


def run(components, images, root, subject="subj", **overrides):
    config = FinetuneConfig(**{"steps": 6, **FAST, **overrides})
    return finetune_subject(components, images, "dog", subject, str(root), config, progress=False)


def test_loss_decreases(components, images, tmp_path):
    manifest = run(components, images, tmp_path, steps=30, learning_rate=2e-2, checkpoint_steps=(30,))
    curve = np.array(manifest["loss_curve"])
    assert len(curve) == 30 and np.isfinite(curve).all()
    assert curve[-10:].mean() < 0.95 * curve[:10].mean()


def test_layout_and_manifest(components, image_dir, tmp_path):
    manifest = run(components, image_uris([str(image_dir)]), tmp_path, steps=8, checkpoint_every=3)
    assert manifest["steps"] == [3, 6, 8]
    assert (manifest["guidance_step"], manifest["edit_step"]) == (3, 8)
    for step in manifest["steps"]:
        assert storage.exists(layout.weight_uri(str(tmp_path), "subj", step, "lora"))
    assert layout.read_manifest(str(tmp_path), "subj") == manifest
    assert manifest["instance_prompt"] == "a photo of sks dog"
    assert manifest["num_instance_images"] == 3 and manifest["kind"] == "lora"
    assert {"torch", "diffusers", "peft"} <= set(manifest["library_versions"])


def test_components_restored_after_lora(components, images, tmp_path):
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    run(components, images, tmp_path)
    after = components.unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not getattr(components.unet, "peft_config", None)
    assert not any(p.requires_grad for p in components.unet.parameters())


def test_lora_loads_in_plain_diffusers_pipeline(components, images, tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    probe = {}
    latents, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    embeds = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(2))

    def record(step, loss):  # the adapter's prediction at the end of training
        if step == 6:
            with torch.no_grad():
                probe["out"] = components.unet(latents, t, embeds).sample

    config = FinetuneConfig(steps=6, lora_alpha=8, **FAST)  # alpha != rank: scale must survive
    finetune_subject(components, images, "dog", "subj", str(tmp_path), config, progress=False,
                     callback=record)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a photo of sks dog", num_inference_steps=3, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = sample()
    pipe.load_lora_weights(layout.checkpoint_uri(str(tmp_path), "subj", 6))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(latents, t, embeds).sample, probe["out"], atol=1e-5, rtol=1e-5)
    tuned = sample()
    assert np.abs(tuned - plain).max() > 1e-4
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(sample(), plain)
    pipe.load_lora_weights(layout.checkpoint_uri(str(tmp_path), "subj", 6))
    np.testing.assert_array_equal(sample(), tuned)


def test_same_seed_same_checkpoints(components, images, tmp_path):
    def blobs(root, seed):
        manifest = run(components, images, root, seed=seed, steps=4, checkpoint_steps=(2, 4))
        return manifest["loss_curve"], [
            checkpoints.decode_safetensors(storage.read_bytes(layout.weight_uri(str(root), "subj", s, "lora")))
            for s in manifest["steps"]]

    curve, first = blobs(tmp_path / "a", 3)
    curve_b, second = blobs(tmp_path / "b", 3)
    assert curve_b == curve
    for (tensors_a, meta_a), (tensors_b, meta_b) in zip(first, second):
        assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    _, other = blobs(tmp_path / "c", 4)
    assert any(not torch.equal(other[-1][0][k], first[-1][0][k]) for k in first[-1][0])


def test_full_finetune_leaves_base_untouched(components, images, tmp_path):
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    manifest = run(components, images, tmp_path, method="full", learning_rate=1e-3, steps=4,
                   checkpoint_steps=(2, 4))
    assert manifest["kind"] == "full"
    tensors, _ = checkpoints.decode_safetensors(
        storage.read_bytes(layout.weight_uri(str(tmp_path), "subj", 4, "full")))
    assert set(tensors) == set(before)
    assert any(not torch.equal(tensors[k], before[k]) for k in before)
    assert all(torch.equal(v, before[k]) for k, v in components.unet.state_dict().items())


def test_prior_preservation_generates_then_reuses_class_images(components, images, tmp_path, monkeypatch):
    prior = dict(prior_preservation=True, num_class_images=2, class_sampling_steps=2, steps=2)
    manifest = run(components, images, tmp_path, **prior)
    assert manifest["num_class_images"] == 2 and manifest["class_prompt"] == "a photo of dog"
    cached = storage.list_files(str(tmp_path / "class_images"))
    assert len(cached) == 2 and all(name.endswith(".png") for name in cached)

    def fail(*args, **kwargs):
        raise AssertionError("class images should come from the cache")

    monkeypatch.setattr("dreamblend_ray.training.finetune.generate_class_images", fail)
    again = run(components, images, tmp_path, subject="other", **prior)
    assert again["num_class_images"] == 2


def test_interrupted_run_leaves_no_manifest(components, images, tmp_path):
    root = str(tmp_path)
    run(components, images, tmp_path, steps=4)
    assert layout.is_complete(root, "subj")

    def interrupt(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    config = FinetuneConfig(steps=8, checkpoint_steps=(3, 8), **FAST)
    with pytest.raises(KeyboardInterrupt):
        finetune_subject(components, images, "dog", "subj", root, config, progress=False, callback=interrupt)
    assert storage.exists(layout.checkpoint_uri(root, "subj", 3))
    assert not layout.is_complete(root, "subj")  # the old pair's manifest went first
    with pytest.raises(FileNotFoundError):
        layout.read_manifest(root, "subj")
    assert not getattr(components.unet, "peft_config", None)


@pytest.mark.parametrize("case", ["no images", "not an image", "too small", "bad subject id",
                                  "too long subject id", "unknown base", "bad class noun"])
def test_bad_input_is_rejected_before_anything_is_written(case, components, images, tmp_path):
    inputs = {"base": components, "images": list(images), "subject_id": "subj", "class_noun": "dog"}
    bad_file = tmp_path / "notes.png"
    bad_file.write_text("not a picture")
    expected = {
        "no images": ("images", [], "no instance images"),
        "not an image": ("images", [str(bad_file)], "notes.png"),
        "too small": ("images", [square(0), square(1, size=8)], "too small"),
        "bad subject id": ("subject_id", "bad/id", "subject_id"),
        "too long subject id": ("subject_id", "x" * 65, "subject_id"),
        "unknown base": ("base", str(tmp_path / "missing-model"), "base model"),
        "bad class noun": ("class_noun", "dog/../cat", "class_noun"),
    }[case]
    inputs[expected[0]] = expected[1]
    root = tmp_path / "out"
    with pytest.raises(ValueError, match=expected[2]):
        finetune_subject(inputs["base"], inputs["images"], inputs["class_noun"], inputs["subject_id"],
                         str(root), FinetuneConfig(steps=2, **FAST), progress=False)
    assert not root.exists()


def test_image_dir_with_no_images(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        image_uris([str(tmp_path)])


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        FinetuneConfig(method="dora")
    with pytest.raises(ValueError, match="checkpoint_steps"):
        FinetuneConfig(steps=10, checkpoint_steps=(11,))
    with pytest.raises(ValueError, match="guidance_step"):
        FinetuneConfig(steps=10, checkpoint_steps=(5, 10), guidance_step=4).default_pair()
    assert FinetuneConfig(steps=400).default_pair() == (100, 400)
    assert FinetuneConfig(steps=10, checkpoint_every=4).schedule() == [4, 8, 10]


def test_cli_finetune(image_dir, tmp_path):
    from dreamblend_ray.cli import main

    out = tmp_path / "out"
    rc = main(["finetune", "--base", "tiny", "--images", str(image_dir), "--class-noun", "dog",
               "--subject-id", "cli-subj", "--output", str(out), "--steps", "3", "--checkpoint-steps",
               "1,3", "--prior-images", "0", "--no-progress"])
    assert rc == 0
    manifest = layout.read_manifest(str(out), "cli-subj")
    assert manifest["steps"] == [1, 3] and manifest["num_class_images"] == 0
    assert main(["finetune", "--base", "tiny", "--images", str(image_dir), "--class-noun", "dog",
                 "--subject-id", "bad id", "--output", str(out), "--steps", "3"]) == 2


def test_gradient_checkpointing_gives_the_same_checkpoints(components, images, tmp_path):
    def weights(root, checkpointing):
        run(components, images, root, steps=3, checkpoint_steps=(3,), gradient_checkpointing=checkpointing)
        return checkpoints.decode_safetensors(
            storage.read_bytes(layout.weight_uri(str(root), "subj", 3, "lora")))[0]

    plain, recomputed = weights(tmp_path / "a", False), weights(tmp_path / "b", True)
    for key, value in plain.items():
        torch.testing.assert_close(recomputed[key], value, rtol=1e-5, atol=1e-6)
    assert not components.unet.is_gradient_checkpointing


def test_s3_output_root(components, images, s3_bucket):
    root = f"{s3_bucket}/runs/a"
    manifest = run(components, images, root, steps=3, checkpoint_steps=(1, 3), prior_preservation=True,
                   num_class_images=1, class_sampling_steps=2)
    assert layout.read_manifest(root, "subj") == manifest
    assert storage.exists(layout.weight_uri(root, "subj", 1, "lora"))
    assert len(storage.list_files(f"{root}/class_images")) == 1
    pair, _ = checkpoints.load_pair(root, "subj", components)
    try:
        assert (pair.guidance_adapter, pair.edit_adapter) == ("subj--g1", "subj--e3")
    finally:
        checkpoints.unload_pair(pair, components)


def test_settings_that_cannot_work_fail_before_training(components, images, tmp_path):
    with pytest.raises(ValueError, match="resolution must be a multiple of 4"):
        run(components, images, tmp_path, resolution=30)
    with pytest.raises(ValueError, match="guidance_step 3 is not a saved checkpoint"):
        run(components, images, tmp_path, guidance_step=3, checkpoint_steps=(2, 6))
    assert not tmp_path.joinpath("subjects").exists()
