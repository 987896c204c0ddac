"""The attention-collapse probe: its maths on hand-made maps, the chooser, the plot, and the
fine-tuning job's --attention-probe / --choose-pair attention on the tiny model."""

import io
import math

import numpy as np
import pytest
import pyarrow.parquet as pq
import torch
from PIL import Image

from dreamblend_ray.config import FinetuneConfig, to_dict
from dreamblend_ray.embedded import world
from dreamblend_ray.embedded.scorer import embedded_prompts  # importing it registers the embedded providers
from dreamblend_ray.evaluation import collapse
from dreamblend_ray.evaluation.pair_choice import PairChoiceOptions
from dreamblend_ray.io import storage
from dreamblend_ray.jobs.cli import finetune_parser, pair_choice_from_args
from dreamblend_ray.jobs.finetune import RESULT_SCHEMA, FinetuneActor, gather_results, subject_items
from dreamblend_ray.jobs.manifests import SubjectSpec
from dreamblend_ray.training import checkpoints, layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_FINETUNE = FinetuneConfig(steps=4, checkpoint_steps=(2, 4), prior_preservation=False, rank=2, seed=0)
GROUPS = [("a", [1]), ("sks", [2]), ("dog", [3]), ("in", [4]), ("the", [5]), ("jungle", [6]), (",", [7])]


# --------------------------------------------------------------------------- maths

def blob(h=8, w=8, rows=slice(0, 2), cols=slice(0, 2)) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[rows, cols] = 1.0
    return m


def token_maps(subject: torch.Tensor, other: torch.Tensor, tokens=8) -> torch.Tensor:
    maps = torch.full((tokens, *subject.shape), 0.01)
    maps[2], maps[3], maps[6] = subject, subject, other
    return maps


def test_split_words_keeps_subject_and_content_words_only():
    subject, other = collapse.split_words(GROUPS, "sks", "dog")
    assert [w for w, _ in subject] == ["sks", "dog"] and [w for w, _ in other] == ["jungle"]
    assert collapse.split_words([("SKS", [1]), ("rc", [2]), ("car", [3])], "sks", "RC car")[1] == []


def test_region_holds_half_the_mass_with_the_fewest_pixels():
    torch.manual_seed(0)
    subject = torch.rand(8, 8) ** 4
    region = collapse.subject_region(subject)
    inside = subject[region].sum() / subject.sum()
    assert inside >= 0.5
    smallest = torch.sort(subject.flatten(), descending=True).values[: int(region.sum()) - 1].sum() / subject.sum()
    assert smallest < 0.5  # one pixel fewer would not hold half
    assert collapse.subject_region(blob(rows=slice(0, 1), cols=slice(0, 1))).sum() == 1
    assert collapse.subject_region(torch.ones(4, 4)).sum() == 8


def test_uniform_map_scores_the_region_area_share():
    subject = blob()  # 4 equal pixels: the region is 2 of the 64
    result = collapse.prompt_measures(token_maps(subject, torch.ones(8, 8)), GROUPS, "sks", "dog")
    assert result["region_area"] == pytest.approx(2 / 64)
    assert result["collapse"] == pytest.approx(2 / 64)
    assert result["entropy_other"] == pytest.approx(1.0)
    assert result["words"] == {"jungle": pytest.approx(2 / 64)}


def test_a_map_on_the_subject_scores_one():
    peaked = blob(rows=slice(3, 4), cols=slice(5, 6))  # all the subject's mass on one pixel
    result = collapse.prompt_measures(token_maps(peaked, peaked), GROUPS, "sks", "dog")
    assert result["collapse"] == pytest.approx(1.0) and result["subject_share"] == pytest.approx(1.0)
    assert result["sharpness"] == pytest.approx(1.0) and result["entropy_subject"] == pytest.approx(0.0)
    # A spread subject map: an equal map scores the subject's own share, a map inside the region 1.
    spread = blob(rows=slice(0, 4), cols=slice(0, 4))
    equal = collapse.prompt_measures(token_maps(spread, spread), GROUPS, "sks", "dog")
    assert equal["collapse"] == pytest.approx(equal["subject_share"]) and equal["subject_share"] >= 0.5
    region = collapse.subject_region(spread * 2)
    inside = collapse.prompt_measures(token_maps(spread, region.float()), GROUPS, "sks", "dog")
    assert inside["collapse"] == pytest.approx(1.0)
    away = collapse.prompt_measures(token_maps(spread, blob(rows=slice(6, 8), cols=slice(6, 8))), GROUPS, "sks", "dog")
    assert away["collapse"] == pytest.approx(0.0)


def test_token_axis_mass_and_layout_correlation():
    subject = blob()  # 4 pixels of weight 1, for each of the two subject tokens
    uniform = collapse.prompt_measures(token_maps(subject, torch.ones(8, 8)), GROUPS, "sks", "dog")
    assert uniform["subject_mass"] == pytest.approx(8 / (8 + 64))
    assert uniform["correlation"] == pytest.approx(0.0)  # a constant map follows no layout
    same = collapse.prompt_measures(token_maps(subject, subject * 3), GROUPS, "sks", "dog")
    assert same["correlation"] == pytest.approx(1.0) and same["subject_mass"] == pytest.approx(8 / 20)
    away = collapse.prompt_measures(token_maps(subject, blob(rows=slice(6, 8), cols=slice(6, 8))), GROUPS, "sks", "dog")
    assert away["correlation"] < 0


def test_entropy_is_bounded_and_extreme_on_extreme_maps():
    torch.manual_seed(1)
    values = collapse.normalised_entropy(torch.rand(5, 6, 6))
    assert values.shape == (5,) and bool(((values >= 0) & (values <= 1)).all())
    assert float(collapse.normalised_entropy(torch.ones(6, 6))) == pytest.approx(1.0)
    assert float(collapse.normalised_entropy(blob(6, 6, slice(0, 1), slice(0, 1)))) == pytest.approx(0.0)
    two = float(collapse.normalised_entropy(blob(6, 6, slice(0, 1), slice(0, 2))))
    assert two == pytest.approx(math.log(2) / math.log(36))


def test_bad_maps_and_prompts_are_value_errors():
    with pytest.raises(ValueError, match="neither the token"):
        collapse.prompt_measures(torch.ones(8, 4, 4), [("a", [1]), ("jungle", [2])], "sks", "dog")
    with pytest.raises(ValueError, match="no content word"):
        collapse.prompt_measures(torch.ones(8, 4, 4), GROUPS[:5], "sks", "dog")
    with pytest.raises(ValueError, match="3 dimensions"):
        collapse.prompt_measures(torch.ones(4, 4), GROUPS, "sks", "dog")
    with pytest.raises(ValueError, match="non-negative"):
        collapse.subject_region(-torch.ones(4, 4))


def test_probe_prompts_are_scenes_or_a_registered_providers():
    prompts = collapse.scene_prompts("dog", "sks", 3)
    assert prompts == ["a sks dog in the jungle", "a sks dog in the snow", "a sks dog on the beach"]
    with pytest.raises(ValueError, match="num_prompts must be at most"):
        collapse.scene_prompts("dog", "sks", 25)
    image = Image.fromarray(np.full((32, 32, 3), world.PALETTE["blue"], np.uint8))
    image.paste(tuple(world.PALETTE["red"]), (8, 8, 24, 24))
    embedded = type("C", (), {"source": "embedded"})()
    assert collapse.probe_prompts(embedded, [image], "shape", "sks", 2) == \
        embedded_prompts([image], "shape", "sks", 2)[0]
    with pytest.raises(ValueError, match="already registered"):
        collapse.register_probe_prompts("embedded", lambda *a: [])


# --------------------------------------------------------------------------- the chooser

def rows_of(scores, steps=None):
    steps = steps or [100 * (i + 1) for i in range(len(scores))]
    return [{"step": s, "collapse": c, "sharpness": 0.1} for s, c in zip(steps, scores)]


def test_rising_scores_pick_the_last_step_below_the_threshold():
    choice = collapse.choose_pair_by_attention(rows_of([0.22, 0.25, 0.3, 0.5, 0.6]), {"collapse": 0.2}, 0.25)
    assert choice["threshold"] == pytest.approx(0.2 + 0.25 * 0.4)
    assert (choice["guidance_step"], choice["edit_step"]) == (300, 500)
    assert not choice["identical"] and not choice["fallback"] and choice["max_collapse"] == 0.6
    # unsorted input, the same choice; a dip after a peak counts (the latest qualifying step)
    shuffled = rows_of([0.5, 0.22, 0.6, 0.25], [400, 100, 500, 200])
    assert collapse.choose_pair_by_attention(shuffled, {"collapse": 0.2}, 0.25)["guidance_step"] == 200
    dip = collapse.choose_pair_by_attention(rows_of([0.6, 0.21, 0.7]), {"collapse": 0.2}, 0.1)
    assert (dip["guidance_step"], dip["edit_step"]) == (200, 300)


def test_flat_scores_give_g_equal_e_the_latest():
    for scores in ([0.3, 0.3, 0.3], [0.3, 0.2, 0.1]):
        choice = collapse.choose_pair_by_attention(rows_of(scores), {"collapse": 0.3}, 0.1)
        assert choice["guidance_step"] == choice["edit_step"] == 300 and choice["identical"]
        assert not choice["collapsed"]


def test_a_rise_below_min_rise_is_no_collapse_and_keeps_the_default_pair():
    noisy = rows_of([0.302, 0.298, 0.304])  # scatter around the base, as on the embedded model
    choice = collapse.choose_pair_by_attention(noisy, {"collapse": 0.3}, 0.1, default=(100, 300))
    assert (choice["guidance_step"], choice["edit_step"]) == (100, 300) and not choice["collapsed"]
    assert not choice["fallback"]
    rising = rows_of([0.305, 0.31, 0.32, 0.45])  # threshold 0.3 + 0.1 * 0.15 = 0.315
    risen = collapse.choose_pair_by_attention(rising, {"collapse": 0.3}, 0.1, default=(100, 400))
    assert risen["collapsed"] and (risen["guidance_step"], risen["edit_step"]) == (200, 400)
    lower = collapse.choose_pair_by_attention(rising, {"collapse": 0.3}, 0.1, min_rise=0.2, default=(100, 400))
    assert not lower["collapsed"] and lower["guidance_step"] == 100


def test_no_qualifying_step_falls_back_to_the_least_collapsed():
    choice = collapse.choose_pair_by_attention(rows_of([0.5, 0.4, 0.4, 0.9]), {"collapse": 0.1}, 0.0)
    assert choice["fallback"] and (choice["guidance_step"], choice["edit_step"]) == (200, 400)


@pytest.mark.parametrize("rows, base, tolerance, message", [
    ([], {"collapse": 0.1}, 0.1, "at least one"),
    ([{"step": 1}], {"collapse": 0.1}, 0.1, r"rows\[0\] \(step 1\) has no collapse"),
    ([{"step": 1, "collapse": float("nan")}], {"collapse": 0.1}, 0.1, "finite"),
    ([{"step": 1, "collapse": 0.1}, {"step": 1, "collapse": 0.2}], {"collapse": 0.1}, 0.1, "twice"),
    ([{"step": -1, "collapse": 0.1}], {"collapse": 0.1}, 0.1, "step"),
    ([{"step": 1, "collapse": 0.1}], 0.1, 0.1, "base model's probe row"),
    ([{"step": 1, "collapse": 0.1}], {"collapse": 0.1}, 1.5, "tolerance"),
])
def test_chooser_rejects_bad_input(rows, base, tolerance, message):
    with pytest.raises(ValueError, match=message):
        collapse.choose_pair_by_attention(rows, base, tolerance)


def test_plot_is_a_png_of_the_requested_size():
    image = collapse.collapse_plot(rows_of([0.2, 0.4, 0.5]), {"collapse": 0.15, "sharpness": 0.05}, size=(500, 300))
    assert image.size == (500, 300) and image.mode == "RGB"
    again = Image.open(io.BytesIO(collapse.png_bytes(image)))
    assert again.format == "PNG" and again.size == (500, 300)
    pixels = np.asarray(image)
    assert (np.abs(pixels - np.array(collapse.COLLAPSE_COLOUR)).sum(-1) == 0).sum() > 50  # the line is drawn
    with pytest.raises(ValueError, match="size"):
        collapse.collapse_plot(rows_of([0.2]), {"collapse": 0.1}, size=(50, 50))


# --------------------------------------------------------------------------- the job

def subject_png(size=32) -> bytes:
    array = np.empty((size, size, 3), np.uint8)
    array[:] = world.PALETTE["blue"]
    array[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = world.PALETTE["red"]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_cli_accepts_attention_choice_without_judge_models():
    parser = finetune_parser()
    args = parser.parse_args(["--subjects", "s", "--output", "o", "--choose-pair", "attention", "--attention-probe",
                              "--choice-tolerance", "0.3"])
    assert args.attention_probe and pair_choice_from_args(args) == PairChoiceOptions("attention", tolerance=0.3)
    assert not parser.parse_args(["--subjects", "s", "--output", "o"]).attention_probe


def test_job_probes_and_chooses_by_attention(tmp_path):
    folder = tmp_path / "images" / "sq"
    for i in range(2):
        storage.write_bytes(str(folder / f"{i}.png"), subject_png())
    (item,) = subject_items([SubjectSpec("sq", "shape", (str(folder),), {})], TINY_FINETUNE)
    output = str(tmp_path / "out")
    options = PairChoiceOptions("attention", num_prompts=2, seeds=(0,), tolerance=0.5)
    actor = FinetuneActor("tiny", output, 1, False, pair_choice=to_dict(options), attention_probe=True)
    assert actor.probe == collapse.ProbeOptions(num_prompts=2, seeds=(0,))
    row = actor.run_one(item)
    assert row["status"] == "succeeded", row["error"]

    manifest = layout.read_manifest(output, "sq")
    probe = manifest["attention_probe"]
    assert [r["step"] for r in probe["rows"]] == manifest["steps"] == [2, 4]
    assert probe["prompts"] == ["a sks shape in the jungle", "a sks shape in the snow"] and probe["seeds"] == [0]
    for entry in probe["rows"] + [probe["base"]]:
        assert 0.0 <= entry["collapse"] <= 1.0 and 0.0 <= entry["sharpness"] <= 1.0
        assert [set(p["words"]) for p in entry["per_prompt"]] == [{"jungle"}, {"snow"}]
    choice = manifest["pair_choice"]
    assert choice["scorer"] == "attention" and choice["edit_step"] == 4
    default = (2, 4)  # the fine-tune's own pair: G nearest a quarter of the run, E the last step
    expected = collapse.choose_pair_by_attention(probe["rows"], probe["base"], 0.5, default=default)
    assert (choice["guidance_step"], choice["threshold"]) == (expected["guidance_step"], expected["threshold"])
    assert (manifest["guidance_step"], manifest["edit_step"]) == (choice["guidance_step"], 4)
    plot = Image.open(io.BytesIO(storage.read_bytes(layout.collapse_plot_uri(output, "sq"))))
    assert plot.format == "PNG" and plot.size == (640, 400)

    assert row["probe_steps"] == [2, 4] and row["base_collapse"] == pytest.approx(probe["base"]["collapse"])
    assert row["collapse_scores"] == pytest.approx([r["collapse"] for r in probe["rows"]])
    assert (row["guidance_step"], row["edit_step"]) == (choice["guidance_step"], 4)
    pair, _ = checkpoints.load_pair(output, "sq", actor.components)
    try:
        assert (pair.meta["guidance_step"], pair.meta["edit_step"]) == (choice["guidance_step"], 4)
    finally:
        checkpoints.unload_pair(pair, actor.components)

    # The results table carries the probe columns; a subject without a probe has nulls.
    results = gather_results(output, "r1", ["sq", "other"], [row])
    table = pq.read_table(results.results_uri)
    assert table.schema.equals(RESULT_SCHEMA)
    by_id = {r["subject_id"]: r for r in table.to_pylist()}
    assert by_id["sq"]["probe_steps"] == [2, 4] and by_id["other"]["collapse_scores"] is None

    # A rerun finds probe and choice recorded: skipped, nothing re-probed.
    assert actor.run_one(item)["status"] == "skipped"
