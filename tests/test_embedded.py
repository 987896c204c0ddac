"""The embedded shapes world, its analytic metrics, the demo subjects, training and the model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dreamblend_ray.embedded import metrics, subjects, world


def random_scene(rng: random.Random, shapes=world.SHAPES) -> world.Scene:
    shape = rng.choice(shapes)
    colour = rng.choice(world.COLOURS)
    background = rng.choice([c for c in world.COLOURS if c != colour])
    return world.Scene(shape, (colour,), background, *world.random_box(rng))


# --------------------------------------------------------------------------- world


def test_every_vocabulary_word_is_one_token():
    tokenizer = world.build_world_tokenizer()
    for word in world.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word
    ids = tokenizer("a sks striped star on a green background").input_ids
    assert len(ids) == 10 <= tokenizer.model_max_length


def test_rendering_is_deterministic_and_shapes_fill_their_box():
    scene = world.Scene("star", ("red", "white"), "black", 15.5, 16.0, 20.0, "checkered")
    first, second = world.render_array(scene), world.render_array(scene)
    assert np.array_equal(first, second)
    for shape in world.SHAPES:
        image = world.render(world.Scene(shape, ("white",), "black", 16, 16, 20))
        reading = metrics.read_image(image)
        cx, cy, w, h = reading.box
        assert abs(cx - 16) <= 0.5 and abs(cy - 16) <= 0.5, shape
        assert 19 <= w <= 21 and 19 <= h <= 21, shape


@pytest.mark.parametrize("kwargs, field", [
    (dict(shape="hexagon"), "shape"), (dict(background="red"), "background"),
    (dict(colours=("pink",)), "colours"), (dict(pattern="dotted"), "pattern"),
    (dict(size=40.0), "size"),
])
def test_scene_rejects_bad_fields(kwargs, field):
    base = dict(shape="circle", colours=("red",), background="blue", cx=16.0, cy=16.0, size=16.0)
    with pytest.raises(ValueError, match=field):
        world.Scene(**(base | kwargs))


def test_held_out_combinations_are_unseen_but_their_pairs_are_seen():
    held, train = set(world.held_out_combos()), set(world.train_combos())
    assert held and not held & train
    assert len(held) + len(train) == len(world.all_combos())
    for combo in held:
        assert any(c.shape == combo.shape and c.colour == combo.colour for c in train)
        assert any(c.colour == combo.colour and c.background == combo.background for c in train)
        assert any(c.shape == combo.shape and c.background == combo.background for c in train)


def test_subject_words_are_never_in_base_captions():
    rng = random.Random(0)
    words = set()
    for _ in range(2000):
        _, caption = world.training_example(rng, world.train_combos(), world.CaptionMix())
        words.update(caption.split())
    assert words <= set(world.vocabulary())
    assert not words & ({"sks", "striped", "checkered", "half"} | set(world.SUBJECT_SHAPES))


# --------------------------------------------------------------------------- metrics


def test_prompt_fidelity_is_perfect_on_clean_renders():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(70)]
    images = [world.render(scene) for scene in scenes]
    prompts = [world.caption(s.shape, s.colours[0], s.background, template=i % 3)
               for i, s in enumerate(scenes)]
    result = metrics.prompt_fidelity(images, prompts)
    assert result["background"] == result["shape"] == result["colour"] == 1.0
    assert result["overall"] == result["all_correct"] == 1.0


def test_prompt_fidelity_fails_wrong_prompts_attribute_by_attribute():
    rng = random.Random(1)
    scenes = [random_scene(rng, world.BASE_SHAPES) for _ in range(40)]
    images = [world.render(scene) for scene in scenes]

    def other(value, choices, avoid=()):
        return next(c for c in choices if c != value and c not in avoid)

    wrong_shape = [world.caption(other(s.shape, world.BASE_SHAPES), s.colours[0], s.background) for s in scenes]
    wrong_colour = [world.caption(s.shape, other(s.colours[0], world.COLOURS, (s.background,)), s.background)
                    for s in scenes]
    wrong_bg = [world.caption(s.shape, s.colours[0], other(s.background, world.COLOURS, s.colours))
                for s in scenes]
    assert metrics.prompt_fidelity(images, wrong_shape)["shape"] == 0.0
    assert metrics.prompt_fidelity(images, wrong_colour)["colour"] == 0.0
    result = metrics.prompt_fidelity(images, wrong_bg)
    assert result["background"] == 0.0 and result["shape"] == result["colour"] == 1.0
    assert result["overall"] == pytest.approx(2 / 3) and result["all_correct"] == 0.0


def test_noise_and_blank_images_have_no_object():
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert not metrics.read_image(noise).has_object
    blank = world.render_array(world.Scene("circle", ("red",), "blue", 16, 16, 4.0)) * 0 + 30
    assert not metrics.read_image(blank).has_object
    assert metrics.prompt_fidelity([noise], ["a red circle on a blue background"])["shape"] == 0.0


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle on a blue background", ("blue", "circle", "red")),
    ("a blue background with a red circle", ("blue", "circle", "red")),
    ("a picture of a yellow cross on a black background", ("black", "cross", "yellow")),
    ("a sks striped star on a white background", ("white", "star", None)),
    ("a sks shape on a green background", ("green", None, None)),
    ("a red sks ring", (None, "ring", "red")),
    ("a photo of sks dog", (None, None, None)),
])
def test_parse_prompt(prompt, expected):
    spec = metrics.parse_prompt(prompt)
    assert (spec.background, spec.shape, spec.colour) == expected


def test_subject_fidelity_separates_subjects_and_solid_shapes():
    for subject in subjects.SUBJECTS:
        own = subject.instance_images()
        assert metrics.subject_fidelity(own, own)["score"] > 0.85, subject.subject_id
        others = [image for s in subjects.SUBJECTS if s is not subject for image in s.instance_images()]
        assert metrics.subject_fidelity(others, own)["score"] < 0.5, subject.subject_id
        solid = [world.render(world.Scene(subject.shape, (subject.colours[0],), subject.background,
                                          16, 16, 20))]
        assert metrics.subject_fidelity(solid, own)["pattern"] < 0.75, subject.subject_id
        noise = [np.zeros((32, 32, 3), dtype=np.uint8)]
        assert metrics.subject_fidelity(noise, own)["score"] == 0.0


def star_with_and_without_companion():
    """The striped star, its first companion prompt, and three renders: star and companion, the
    star alone, the companion alone."""
    subject = subjects.get_subject("striped-star")
    shape, colour = subject.companions()[0]
    star = world.Scene(subject.shape, subject.colours, subject.background, 9, 9, 14, subject.pattern)
    companion = world.Scene(shape, (colour,), subject.background, 24, 24, 12)
    images = [world.render(star, companion), world.render(star), world.render(companion)]
    return subject, subject.companion_prompt(shape, colour), images


def test_subject_fidelity_by_context_splits_on_the_second_object():
    subject, prompt, images = star_with_and_without_companion()
    own = subject.instance_images()
    split = metrics.subject_fidelity_by_context(images, [prompt] * 3, own)
    assert [metrics.context_right(image, prompt) for image in images] == [True, False, True]
    per_image = [metrics.subject_fidelity([image], own)["score"] for image in images]
    assert per_image[0] > 0.6 > per_image[2]
    assert split["score"] == pytest.approx(metrics.subject_fidelity(images, own)["score"])
    assert split["context_right"] == pytest.approx(2 / 3)
    assert split["when_right"] == pytest.approx((per_image[0] + per_image[2]) / 2)
    assert split["when_wrong"] == pytest.approx(per_image[1])
    assert metrics.subject_fidelity_by_context(images[1:2], [prompt], own)["when_right"] is None
    with pytest.raises(ValueError, match="no context"):
        metrics.context_right(images[0], subject.instance_prompt)
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.subject_fidelity_by_context(images, [prompt], own)


def test_diversity_grows_with_spread_of_position_and_size():
    same = [world.render(world.Scene("circle", ("red",), "blue", 16, 16, 16))] * 4
    assert metrics.diversity(same)["score"] == 0.0
    rng = random.Random(2)
    varied = [world.render(world.Scene("circle", ("red",), "blue", *world.random_box(rng))) for _ in range(8)]
    spread = metrics.diversity(varied)
    assert spread["score"] > 0.05 and spread["position"] > 0 and spread["size"] > 0
    assert spread["missing"] == 0


# --------------------------------------------------------------------------- subjects


def test_demo_subjects_are_outside_the_base_world():
    assert len(subjects.SUBJECTS) == 3
    for subject in subjects.SUBJECTS:
        images = subject.instance_images()
        assert 4 <= len(images) <= 6
        readings = [metrics.read_image(image) for image in images]
        assert {r.background for r in readings} == {subject.background}
        assert all(r.shape == subject.shape for r in readings)
        assert subject.shape not in world.BASE_SHAPES and subject.pattern != "solid"
        boxes = {r.box for r in readings}
        assert len(boxes) == len(images)  # varied position and size
        assert subject.background not in subject.new_backgrounds()
        assert metrics.parse_prompt(subject.prompt("red")).background == "red"
    with pytest.raises(ValueError, match="subject"):
        subjects.get_subject("unknown")


def test_subject_instance_images_save(tmp_path):
    subject = subjects.get_subject("half-ring")
    paths = subject.save_instance_images(tmp_path)
    assert len(paths) == subject.num_images and all(p.is_file() for p in paths)


# --------------------------------------------------------------------------- training


def test_latent_normalisation_folds_exactly():
    from dreamblend_ray.embedded.train import build_models, encode, fold_latent_normalisation, render_scenes

    vae, *_ = build_models(seed=0)
    vae.eval()
    images, _ = render_scenes(16, seed=0)
    means, stds = encode(vae, images)
    with torch.no_grad():
        before = vae.decode(means).sample
    mu, sigma = means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))
    fold_latent_normalisation(vae, mu, sigma)
    new_means, new_stds = encode(vae, images)
    torch.testing.assert_close(new_means, (means - mu.view(1, -1, 1, 1)) / sigma.view(1, -1, 1, 1),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_stds, stds / sigma.view(1, -1, 1, 1), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(new_means).sample, before, atol=1e-4, rtol=1e-4)


def test_train_config_validates():
    from dreamblend_ray.embedded.train import TrainConfig

    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)


@pytest.mark.slow
def test_training_writes_a_loadable_model(tmp_path):
    from dreamblend_ray.models.components import load_components
    from dreamblend_ray.embedded.train import TrainConfig, train

    config = TrainConfig(scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, batch=4,
                         checkpoint_every=1, decoder_steps=2, decoder_scenes=64, compose_steps=2,
                         compose_scenes=64, threads=1)
    out = train(tmp_path / "model", config)
    components = load_components(str(out))
    assert components.default_size == world.IMAGE_SIZE
    assert components.vae.config.scaling_factor == 1.0
    assert (out / "checkpoints" / "step-2" / "model_index.json").is_file()


def test_decoder_refinement_keeps_the_latent_space_and_learns(tmp_path):
    """Stage 4 trains the decoder only: the encoder's latents (what the UNet was trained on) are
    bit-identical afterwards, the decoder's reconstruction loss on the patterned scenes falls."""
    from dreamblend_ray.embedded.train import TrainConfig, build_models, encode, refine_decoder, render_pattern_scenes

    vae, *_ = build_models(seed=0)
    vae.eval()
    images = render_pattern_scenes(64, seed=5)
    before = encode(vae, images)
    encoder_state = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith("decoder.")}
    config = TrainConfig(decoder_steps=30, vae_batch=16, decoder_lr=2e-3, threads=1)
    losses = refine_decoder(vae, images, config)
    after = encode(vae, images)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    for key, value in vae.state_dict().items():
        if not key.startswith("decoder."):
            assert torch.equal(value, encoder_state[key]), key
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert not any(p.requires_grad for p in vae.parameters())


def test_decoder_only_needs_a_model(tmp_path):
    from dreamblend_ray.cli import main

    with pytest.raises(SystemExit, match="model_index.json"):
        main(["train-embedded", "--decoder-only", "--out", str(tmp_path / "missing")])


def test_cli_train_embedded_parses_and_validates(capsys):
    from dreamblend_ray.cli import main

    with pytest.raises(SystemExit, match="batch"):
        main(["train-embedded", "--out", "unused", "--batch", "0"])


# --------------------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def embedded():
    from dreamblend_ray.models.components import load_components

    return load_components("embedded")


def test_embedded_model_loads_like_stable_diffusion(embedded):
    assert embedded.source == "embedded"
    assert embedded.default_size == world.IMAGE_SIZE
    assert embedded.vae_scale_factor == 2
    tokenizer = embedded.tokenizer
    for word in world.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word
    weights = sum(p.stat().st_size for p in __import__("pathlib").Path(
        __import__("dreamblend_ray.models.components", fromlist=["x"]).embedded_model_dir()).rglob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024


@pytest.mark.slow
def test_embedded_model_follows_prompts(embedded):
    from dreamblend_ray.embedded.evaluate import generate

    torch.set_num_threads(min(2, torch.get_num_threads()))
    combos = world.held_out_combos()[:6]
    prompts = [world.prompt(combo) for combo in combos]
    images = generate(embedded, prompts, seeds=list(range(len(prompts))), steps=20, guidance_scale=2.0)
    result = metrics.prompt_fidelity(images, prompts)
    assert result["overall"] >= 0.75, result
