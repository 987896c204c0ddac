"""Two objects per image in the embedded shapes world: rendering, box placement, pair combos,
the metrics that read every object, the pair captions of training and stage 5 (two-object
fine-tuning of the UNet)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from dreamblend_ray.embedded import metrics, subjects, world


def shape_area(shape: str, size: float, n: int = 400) -> float:
    """The analytic area (pixels) of ``shape`` in a box of side ``size``, on a fine grid."""
    grid = (np.arange(n) + 0.5) / n * 2 - 1
    u, v = np.meshgrid(grid, grid)
    return float(world.shape_mask(shape, u, v).mean()) * size * size


def pixel_box(scene: world.Scene) -> tuple[slice, slice]:
    """The rows and columns of the pixels that the scene's box touches."""
    half = scene.size / 2
    return (slice(math.floor(scene.cy - half), math.ceil(scene.cy + half)),
            slice(math.floor(scene.cx - half), math.ceil(scene.cx + half)))


def clean_pairs(count: int, seed: int):
    """``count`` seeded random pairs from the training combos and their scenes."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        pair = world.random_pair(rng, world.train_combos())
        pairs.append((pair, world.pair_scenes(rng, pair)))
    return pairs


def noun(scene: world.Scene) -> str:
    return f"{scene.colours[0]} {scene.shape}"


# --------------------------------------------------------------------------- rendering


def test_two_objects_are_both_drawn_with_their_own_area():
    """Each object's colour covers its shape's area inside its own box (measured as coverage:
    the projection of each pixel onto the line background -> object colour), and every pixel
    outside both boxes is the background; for many random pairs."""
    for pair, (first, second) in clean_pairs(60, seed=3):
        array = world.render_array(first, second).astype(np.float64)
        assert array.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        background = np.array(world.PALETTE[pair.background], dtype=np.float64)
        outside = np.ones(array.shape[:2], dtype=bool)
        for scene in (first, second):
            rows, cols = pixel_box(scene)
            direction = np.array(world.PALETTE[scene.colours[0]], dtype=np.float64) - background
            coverage = (array[rows, cols] - background) @ direction / (direction @ direction)
            expected = shape_area(scene.shape, scene.size)
            assert coverage.sum() == pytest.approx(expected, rel=0.08), (scene, pair)
            assert coverage.min() >= -1e-3 and coverage.max() <= 1 + 1e-3
            outside[rows, cols] = False
        assert (array[outside] == background).all(), pair


def test_pair_rendering_is_deterministic_and_adds_to_the_single_render():
    first = world.Scene("circle", ("red",), "blue", 8.0, 16.0, 12.0)
    second = world.Scene("square", ("yellow",), "blue", 24.0, 16.0, 10.0)
    both = world.render_array(first, second)
    assert np.array_equal(both, world.render_array(first, second))
    assert np.array_equal(np.asarray(world.render(first, second)), np.asarray(world.render(first, second)))
    # Outside the second object's box the image is the first object's own render, and vice versa.
    for scene, other in ((first, second), (second, first)):
        alone = world.render_array(scene)
        rows, cols = pixel_box(other)
        mask = np.ones(both.shape[:2], dtype=bool)
        mask[rows, cols] = False
        assert np.array_equal(both[mask], alone[mask])
        assert not np.array_equal(both, alone)
    # Exact colours where the objects are solid: the circle's centre and the square's.
    assert tuple(both[16, 8]) == world.PALETTE["red"]
    assert tuple(both[16, 24]) == world.PALETTE["yellow"]
    # Order matters only where objects overlap; here they do not.
    assert np.array_equal(both, world.render_array(second, first))


def test_objects_on_different_backgrounds_are_rejected():
    first = world.Scene("circle", ("red",), "blue", 8.0, 16.0, 12.0)
    other = world.Scene("square", ("yellow",), "green", 24.0, 16.0, 10.0)
    with pytest.raises(ValueError, match="background"):
        world.render_array(first, other)
    with pytest.raises(ValueError, match="background"):
        world.render(first, world.Scene("circle", ("red",), "blue", 24, 16, 10), other)


# --------------------------------------------------------------------------- boxes


def test_boxes_apart_measures_the_gap_along_either_axis():
    a = (8.0, 16.0, 10.0)
    assert world.boxes_apart(a, (20.0, 16.0, 10.0))  # 12 apart = 10 + gap 2
    assert not world.boxes_apart(a, (19.5, 16.0, 10.0))
    assert world.boxes_apart(a, (8.0, 28.0, 10.0))  # apart vertically
    assert not world.boxes_apart(a, (19.0, 27.0, 10.0))  # diagonal, under the gap on both axes
    assert world.boxes_apart(a, (19.0, 16.0, 10.0), gap=1.0)


@pytest.mark.parametrize("count, low, high", [(2, *world.PAIR_SIZE), (3, 6.0, 9.0)])
def test_random_boxes_are_seeded_inside_and_apart(count, low, high):
    for seed in range(150):
        boxes = world.random_boxes(random.Random(seed), count, low, high)
        assert boxes == world.random_boxes(random.Random(seed), count, low, high)
        assert len(boxes) == count
        for cx, cy, size in boxes:
            assert low <= size <= high
            for centre in (cx, cy):
                assert centre - size / 2 >= world.MARGIN - 1e-9
                assert centre + size / 2 <= world.IMAGE_SIZE - world.MARGIN + 1e-9
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                gap_x = abs(a[0] - b[0]) - (a[2] + b[2]) / 2
                gap_y = abs(a[1] - b[1]) - (a[2] + b[2]) / 2
                assert max(gap_x, gap_y) >= world.GAP, (seed, a, b)
    assert world.random_boxes(random.Random(0), 2) != world.random_boxes(random.Random(1), 2)


def test_random_boxes_rejects_impossible_requests():
    with pytest.raises(ValueError, match="could not place"):
        world.random_boxes(random.Random(0), 10, 14.0, 14.0, tries=50)
    with pytest.raises(ValueError, match="could not place"):
        world.random_boxes(random.Random(0), 2, 20.0, 22.0, tries=200)


# --------------------------------------------------------------------------- pair combos


def test_pair_combo_validates():
    red_circle = world.Combo("circle", "red", "blue")
    with pytest.raises(ValueError, match="background"):
        world.PairCombo(red_circle, world.Combo("square", "yellow", "green"))
    with pytest.raises(ValueError, match="differ"):
        world.PairCombo(red_circle, world.Combo("circle", "red", "blue"))
    # Same shape in another colour, or another shape in the same colour, is a pair.
    assert world.PairCombo(red_circle, world.Combo("circle", "yellow", "blue")).background == "blue"
    assert world.PairCombo(red_circle, world.Combo("square", "red", "blue")).background == "blue"


def test_random_pair_draws_two_different_train_objects_on_one_background():
    combos = world.train_combos()
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        pair = world.random_pair(rng, combos)
        assert isinstance(pair, world.PairCombo)
        assert pair.first in combos and pair.second in combos
        assert pair.first.background == pair.second.background == pair.background
        assert (pair.first.shape, pair.first.colour) != (pair.second.shape, pair.second.colour)
        seen.add(pair.background)
    assert seen == set(world.COLOURS)
    assert world.random_pair(random.Random(4), combos) == world.random_pair(random.Random(4), combos)
    first, second = world.pair_scenes(random.Random(2), pair)
    assert (first.shape, first.colours) == (pair.first.shape, (pair.first.colour,))
    assert first.background == second.background == pair.background
    assert (second.shape, second.colours) == (pair.second.shape, (pair.second.colour,))
    assert world.boxes_apart((first.cx, first.cy, first.size), (second.cx, second.cy, second.size))


def test_pair_caption_templates():
    assert world.pair_caption("red circle", "blue square", "green") == \
        "a red circle and a blue square on a green background"
    assert world.pair_caption("red circle", "square", "green", template=1) == \
        "a green background with a red circle and a square"
    assert world.pair_caption("circle", "blue square", None) == "a circle and a blue square"


# --------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def read_pairs():
    """100 clean random pairs, their images and readings."""
    result = []
    for pair, scenes in clean_pairs(100, seed=0):
        image = world.render(*scenes)
        result.append((pair, scenes, image, metrics.read_objects(image)))
    return result


def test_read_objects_finds_both_objects_of_clean_pairs(read_pairs):
    """Exactly two objects everywhere; their shapes and colours right in all but a rare few
    (pair objects are 10-14 px, below the single-object range: e.g. a 12 px circle can read as a
    square)."""
    wrong = []
    for pair, (first, second), image, readings in read_pairs:
        assert len(readings) == 2, pair
        assert all(r.background == pair.background for r in readings)
        found = sorted(((r.shape, r.colour) for r in readings), key=str)
        if found != sorted([(first.shape, first.colours[0]), (second.shape, second.colours[0])], key=str):
            wrong.append((first, second, found))
    assert len(wrong) <= 2, wrong


def test_pair_prompts_score_attribute_by_attribute(read_pairs):
    checked = 0
    for pair, (first, second), image, readings in read_pairs:
        expected = sorted([(first.shape, first.colours[0]), (second.shape, second.colours[0])], key=str)
        if sorted(((r.shape, r.colour) for r in readings), key=str) != expected:
            continue  # a rare misreading, counted by the test above
        checked += 1
        background = pair.background
        right = metrics.score_prompt(image, world.pair_caption(noun(first), noun(second), background))
        assert right == {"background": True, "shape": True, "colour": True}, pair
        swapped = metrics.score_prompt(image, world.pair_caption(noun(second), noun(first), background, 1))
        assert swapped == right

        other_shape = next(s for s in world.BASE_SHAPES if s not in (first.shape, second.shape))
        wrong_shape = metrics.score_prompt(
            image, world.pair_caption(noun(first), f"{second.colours[0]} {other_shape}", background))
        assert wrong_shape["shape"] is False and wrong_shape["background"] is True, pair

        other_colour = next(c for c in world.COLOURS
                            if c not in (first.colours[0], second.colours[0], background))
        wrong_colour = metrics.score_prompt(
            image, world.pair_caption(noun(first), f"{other_colour} {second.shape}", background))
        assert wrong_colour == {"background": True, "shape": True, "colour": False}, pair

        if checked % 4 == 0:  # a quarter: every read costs
            caption = world.pair_caption(noun(first), noun(second), background)
            single = metrics.score_prompt(world.render(first), caption)
            assert not all(single.values())
            if first.shape != second.shape:
                assert single["shape"] is False, pair
            else:
                assert single["colour"] is False, pair
    assert checked >= 98


def test_parse_prompt_lists_every_noun():
    spec = metrics.parse_prompt("a sks shape and a red circle on a blue background")
    assert spec.background == "blue"
    assert spec.objects == (("shape", None), ("circle", "red"))
    assert spec.named_objects == [("circle", "red")]
    assert (spec.shape, spec.colour) == ("circle", "red")

    pair = metrics.parse_prompt("a green background with a red circle and a square")
    assert pair.background == "green"
    assert pair.objects == (("circle", "red"), ("square", None))
    assert pair.named_objects == [("circle", "red"), ("square", None)]


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle on a blue background", ("blue", "circle", "red", (("circle", "red"),))),
    ("a blue background with a red circle", ("blue", "circle", "red", (("circle", "red"),))),
    ("a sks shape on a green background", ("green", None, None, (("shape", None),))),
    ("a sks striped star on a white background", ("white", "star", None, (("star", None),))),
    ("a red sks ring", (None, "ring", "red", (("ring", "red"),))),
    ("a photo of sks dog", (None, None, None, ())),
])
def test_single_noun_parses_are_unchanged(prompt, expected):
    spec = metrics.parse_prompt(prompt)
    assert (spec.background, spec.shape, spec.colour, spec.objects) == expected
    assert spec.asked() == {k: v for k, v in zip(metrics.ATTRIBUTES, expected[:3]) if v}


def test_single_noun_prompts_still_read_one_object():
    scene = world.Scene("circle", ("red",), "blue", 16, 16, 18)
    image = world.render(scene)
    assert metrics.score_prompt(image, "a red circle on a blue background") == \
        {"background": True, "shape": True, "colour": True}
    assert metrics.score_prompt(image, "a red square on a blue background")["shape"] is False


# --------------------------------------------------------------------------- subjects


def test_subject_fidelity_finds_the_subject_beside_a_companion():
    """With a companion object beside it, the subject scores as it does alone (the best-matching
    object counts, even when the companion is the larger one); the companion alone scores low."""
    for subject in subjects.SUBJECTS:
        references = [metrics.object_crop(image) for image in subject.instance_images()]
        rng = random.Random(subject.subject_id)
        layouts = [((7.5, 16.0, 12.0), (23.5, 16.0, 14.0))]  # the companion is the larger
        layouts += [tuple(world.random_boxes(rng, 2, 12.0, 16.0)) for _ in range(2)]
        for shape, colour in subject.companions():
            for subject_box, companion_box in layouts:
                own = world.Scene(subject.shape, subject.colours, subject.background, *subject_box,
                                  subject.pattern)
                companion = world.Scene(shape, (colour,), subject.background, *companion_box)
                alone = metrics.subject_scores(world.render(own), references)["score"]
                together = metrics.subject_scores(world.render(own, companion), references)["score"]
                only_companion = metrics.subject_scores(world.render(companion), references)["score"]
                label = (subject.subject_id, shape, colour, subject_box)
                assert alone > 0.7, label
                assert abs(together - alone) <= 0.1, label
                assert only_companion < alone - 0.3, label
        assert metrics.subject_scores(world.render(own, companion), [])["score"] == 0.0


def test_subject_companions_and_their_prompts():
    for subject in subjects.SUBJECTS:
        companions = subject.companions()
        assert companions
        assert len({colour for _, colour in companions}) == len(companions)
        for shape, colour in companions:
            assert shape in world.BASE_SHAPES
            assert colour in world.COLOURS
            assert colour != subject.background and colour not in subject.colours
            spec = metrics.parse_prompt(subject.companion_prompt(shape, colour))
            assert spec.background == subject.background
            assert spec.named_objects == [(shape, colour)]
            assert spec.objects == ((subject.class_noun, None), (shape, colour))
            assert subject.token in subject.companion_prompt(shape, colour).split()
        # Every colour that is neither the subject's nor its background's has a companion.
        assert {c for _, c in companions} == set(world.COLOURS) - {subject.background} - set(subject.colours)


# --------------------------------------------------------------------------- training data


def test_render_mixed_scenes_mixes_single_and_pair_scenes():
    from dreamblend_ray.embedded.train import render_mixed_scenes

    images, combos = render_mixed_scenes(64, seed=3, pairs=0.5)
    assert images.shape == (64, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert len(combos) == 64
    pairs = sum(isinstance(c, world.PairCombo) for c in combos)
    singles = sum(type(c) is world.Combo for c in combos)
    assert pairs + singles == 64 and 20 <= pairs <= 44
    again, combos_again = render_mixed_scenes(64, seed=3, pairs=0.5)
    assert torch.equal(images, again) and combos == combos_again
    assert not torch.equal(images, render_mixed_scenes(64, seed=4, pairs=0.5)[0])
    # Each image shows its combo: its background and its number of objects.
    for image, combo in zip(images, combos):
        array = ((image.permute(1, 2, 0) + 1) * 127.5).numpy()
        assert metrics.border_background(array) == combo.background
        assert len(metrics.object_masks(array)) == (2 if isinstance(combo, world.PairCombo) else 1)
    assert all(type(c) is world.Combo for c in render_mixed_scenes(16, seed=0, pairs=0.0)[1])
    assert all(isinstance(c, world.PairCombo) for c in render_mixed_scenes(16, seed=0, pairs=1.0)[1])


def test_random_caption_of_a_pair_names_both_objects():
    from dreamblend_ray.embedded.train import random_caption

    rng = random.Random(0)
    combos = world.train_combos()
    exact, draws = 0, 400
    words = set()
    for _ in range(draws):
        pair = world.random_pair(rng, combos)
        text = random_caption(rng, pair, uncond=0.0)
        words.update(text.split())
        spec = metrics.parse_prompt(text)
        assert len(spec.objects) == 2, text
        assert sorted(s for s, _ in spec.objects) == sorted([pair.first.shape, pair.second.shape]), text
        wanted = {(pair.first.shape, pair.first.colour), (pair.second.shape, pair.second.colour)}
        for shape, colour in spec.objects:
            assert colour is None or (shape, colour) in wanted, text  # a colour is dropped, never wrong
        assert spec.background in (None, pair.background), text
        if set(spec.objects) == wanted and spec.background == pair.background:
            exact += 1
    assert exact >= 0.75 * draws
    assert exact < draws  # colours and backgrounds are dropped now and then
    assert words <= set(world.vocabulary())
    assert not words & ({"sks", "striped", "checkered", "half"} | set(world.SUBJECT_SHAPES))
    assert random_caption(random.Random(0), pair, uncond=1.0) == ""
    single = metrics.parse_prompt(random_caption(random.Random(1), world.Combo("circle", "red", "blue"), 0.0))
    assert len(single.objects) == 1 and single.objects[0][0] in ("circle", "shape")


def test_pair_caption_rates_name_objects_generically_and_drop_colours():
    """``compose_generic_noun`` names an object "shape" (the form of "a sks shape and a red
    circle") and ``compose_drop_colour`` leaves its colour out, each at about its rate; the
    defaults draw the same captions as before the options existed (the shipped weights' stream)."""
    from dreamblend_ray.embedded.train import random_pair_caption

    combos = world.train_combos()
    rng = random.Random(3)
    pairs = [world.random_pair(rng, combos) for _ in range(600)]
    nouns = []
    for pair in pairs:
        spec = metrics.parse_prompt(random_pair_caption(random.Random(id(pair) % 9973), pair, 0.3, 0.25))
        assert len(spec.objects) == 2
        nouns += spec.objects
    generic = np.mean([shape == "shape" for shape, _ in nouns])
    uncoloured = np.mean([colour is None for _, colour in nouns])
    assert 0.2 < generic < 0.3 and 0.25 < uncoloured < 0.35, (generic, uncoloured)

    def legacy(rng, pair):  # the caption rule before the rates were options
        objects = [pair.first, pair.second]
        rng.shuffle(objects)
        nouns = [c.shape if rng.random() < 0.05 else f"{c.colour} {c.shape}" for c in objects]
        background = None if rng.random() < 0.05 else pair.background
        return world.pair_caption(*nouns, background, template=int(rng.random() < 0.2))

    for seed, pair in enumerate(pairs[:200]):
        assert random_pair_caption(random.Random(seed), pair) == legacy(random.Random(seed), pair)


def test_train_config_validates_compose_fields():
    from dreamblend_ray.embedded.train import TrainConfig

    with pytest.raises(ValueError, match="compose_pairs"):
        TrainConfig(compose_pairs=1.5)
    with pytest.raises(ValueError, match="compose_pairs"):
        TrainConfig(compose_pairs=-0.1)
    with pytest.raises(ValueError, match="compose_scenes"):
        TrainConfig(compose_scenes=10)
    with pytest.raises(ValueError, match="compose_steps"):
        TrainConfig(compose_steps=-1)
    for name in ("compose_drop_colour", "compose_generic_noun"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: 1.5})
    assert TrainConfig(compose_pairs=1.0, compose_steps=0).compose_pairs == 1.0


def test_compose_only_needs_a_model(tmp_path, monkeypatch):
    """``--compose-only`` on a directory without a model stops with an error naming
    model_index.json, like ``--decoder-only``; it must never fall back to a full training."""
    from dreamblend_ray.cli import main
    from dreamblend_ray.embedded import train as train_module

    def no_full_training(*args, **kwargs):
        raise AssertionError("--compose-only started a full training run instead of stage 5")

    monkeypatch.setattr(train_module, "train", no_full_training)
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_index.json"):
        train_module.main(["--compose-only", "--out", missing])
    with pytest.raises(SystemExit, match="model_index.json"):
        main(["train-embedded", "--compose-only", "--out", missing])


def test_compose_only_and_decoder_only_exclude_each_other(tmp_path, capsys):
    from dreamblend_ray.cli import main
    from dreamblend_ray.embedded import train as train_module

    argv = ["--compose-only", "--decoder-only", "--out", str(tmp_path / "missing")]
    with pytest.raises(SystemExit) as cli_exit:
        main(["train-embedded"] + argv)
    assert cli_exit.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as module_exit:
        train_module.main(argv)
    assert module_exit.value.code == 2


# --------------------------------------------------------------------------- stage 5


def _state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    assert files, path
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def test_stage_five_trains_the_unet_and_keeps_the_vae(tmp_path):
    from dreamblend_ray.models.components import load_components
    from dreamblend_ray.embedded.train import TrainConfig, train, train_compose_only

    threads = torch.get_num_threads()
    try:
        base = TrainConfig(scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, batch=4,
                           decoder_steps=2, decoder_scenes=64, compose_steps=0, threads=1)
        out = train(tmp_path / "model", base)
        meta_before = json.loads((out / "training.json").read_text())
        vae_before, unet_before = _state(out / "vae"), _state(out / "unet")
        text_before = _state(out / "text_encoder")

        stage = TrainConfig(compose_steps=3, compose_scenes=64, compose_lr=1e-3, compose_pairs=0.5,
                            batch=4, threads=1)
        assert train_compose_only(out, stage) == out
    finally:
        torch.set_num_threads(threads)

    vae_after, unet_after = _state(out / "vae"), _state(out / "unet")
    assert vae_after.keys() == vae_before.keys()
    assert all(torch.equal(vae_after[k], vae_before[k]) for k in vae_before)
    assert unet_after.keys() == unet_before.keys()
    changed = [k for k in unet_before if not torch.equal(unet_after[k], unet_before[k])]
    assert len(changed) >= len(unet_before) // 2, f"only {len(changed)} UNet tensors changed"
    assert all(torch.isfinite(v).all() for v in unet_after.values())
    text_after = _state(out / "text_encoder")
    assert any(not torch.equal(text_after[k], text_before[k]) for k in text_before)

    meta = json.loads((out / "training.json").read_text())
    assert meta["timings"]["compose_s"] > meta_before["timings"]["compose_s"]
    assert meta["timings"]["unet_s"] == meta_before["timings"]["unet_s"]
    compose_config = {k: v for k, v in meta["config"].items() if k.startswith("compose_")}
    assert compose_config == {"compose_steps": 3, "compose_scenes": 64, "compose_lr": 1e-3, "compose_pairs": 0.5,
                              "compose_drop_colour": 0.05, "compose_generic_noun": 0.0}  # the captions recorded too
    assert meta["config"]["scenes"] == 64 and meta["config"]["unet_steps"] == 2  # the base run's
    assert math.isfinite(meta["compose_loss_last100"])

    components = load_components(str(out))
    assert components.default_size == world.IMAGE_SIZE
    assert components.vae.config.scaling_factor == 1.0


def test_context_fidelity_reads_the_new_context():
    from dreamblend_ray.embedded import metrics as m

    assert m.context_fidelity({"background": 1.0, "shape": 0.5, "colour": 0.25}) == 0.375
    assert m.context_fidelity({"background": 0.75, "shape": None, "colour": None}) == 0.75
    with pytest.raises(ValueError):
        m.context_fidelity({"background": None, "shape": None, "colour": None})


def test_context_prompts_of_both_kinds():
    from dreamblend_ray.embedded.subjects import SUBJECTS

    subject = SUBJECTS[0]
    companions = subject.context_prompts("companion", 3)
    assert companions == [subject.companion_prompt(*c) for c in subject.companions()[:3]]
    assert subject.context_prompts("background", 2) == [subject.prompt(b) for b in subject.new_backgrounds()[:2]]
    with pytest.raises(ValueError, match="context"):
        subject.context_prompts("sky", 1)
