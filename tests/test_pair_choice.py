"""Automatic checkpoint-pair choice on constructed score tables, and the checkpoint scoring hook."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.evaluation.pair_choice import choose_pair, score_checkpoints, score_model, validate_scores


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def table(*rows):
    return [{"step": s, "prompt_fidelity": p, "subject_fidelity": q} for s, p, q in rows]


# The typical run: prompt fidelity falls and subject fidelity rises with training.
TYPICAL = table((100, 0.30, 0.40), (200, 0.29, 0.50), (300, 0.275, 0.60), (400, 0.25, 0.70),
                (500, 0.20, 0.75))


def test_typical_run_picks_late_guidance_and_best_edit():
    choice = choose_pair(TYPICAL, base_prompt_fidelity=0.30, tolerance=0.1)
    # threshold 0.27: steps 100-300 qualify, 300 is the latest; 500 has the best likeness.
    assert choice["guidance_step"] == 300 and choice["edit_step"] == 500
    assert choice["threshold"] == pytest.approx(0.27)
    assert not choice["fallback"] and not choice["identical"]
    assert [r["step"] for r in choice["scores"]] == [100, 200, 300, 400, 500]


def test_tolerance_moves_the_guidance_step():
    assert choose_pair(TYPICAL, 0.30, tolerance=0.0)["guidance_step"] == 100
    assert choose_pair(TYPICAL, 0.30, tolerance=0.2)["guidance_step"] == 400
    assert choose_pair(TYPICAL, 0.30, tolerance=1.0)["guidance_step"] == 500


def test_latest_qualifying_even_after_a_dip():
    # Step 200 dips below the threshold, step 300 recovers: the latest qualifying one wins.
    scores = table((100, 0.30, 0.1), (200, 0.20, 0.2), (300, 0.29, 0.3), (400, 0.10, 0.4))
    assert choose_pair(scores, 0.30)["guidance_step"] == 300


def test_order_of_rows_does_not_matter():
    assert choose_pair(list(reversed(TYPICAL)), 0.30) == choose_pair(TYPICAL, 0.30)


def test_fallback_when_nothing_keeps_prompt_fidelity():
    scores = table((100, 0.10, 0.5), (200, 0.15, 0.6), (300, 0.15, 0.7))
    choice = choose_pair(scores, base_prompt_fidelity=0.30)
    assert choice["fallback"]
    assert choice["guidance_step"] == 200  # most prompt-faithful; tie -> earliest
    assert choice["edit_step"] == 300


def test_edit_ties_go_to_the_earliest():
    scores = table((100, 0.3, 0.5), (200, 0.2, 0.8), (300, 0.1, 0.8))
    assert choose_pair(scores, 0.3)["edit_step"] == 200


def test_identical_pair_when_best_likeness_is_prompt_faithful():
    scores = table((100, 0.30, 0.5), (200, 0.30, 0.9), (300, 0.10, 0.6))
    choice = choose_pair(scores, 0.30)
    assert choice["guidance_step"] == choice["edit_step"] == 200 and choice["identical"]


def test_edit_never_precedes_guidance():
    # The most subject-faithful checkpoint (step 20) comes before G (step 40, the latest that keeps
    # prompt fidelity): E is chosen among steps >= 40, and the reason names the passed-over step.
    scores = table((20, 0.30, 0.9), (40, 0.29, 0.4), (60, 0.10, 0.6), (80, 0.05, 0.5))
    choice = choose_pair(scores, 0.30)
    assert choice["guidance_step"] == 40 and choice["edit_step"] == 60
    assert not choice["identical"]
    assert "step 20" in choice["edit_reason"] and "before G" in choice["edit_reason"]


def test_edit_equals_guidance_when_nothing_later_is_more_faithful():
    # The case: a short fine-tune where G = step 20 and the best likeness is at step 2.
    scores = table((2, 0.10, 0.9), (10, 0.29, 0.3), (20, 0.28, 0.5))
    choice = choose_pair(scores, 0.30)
    assert choice["guidance_step"] == choice["edit_step"] == 20 and choice["identical"]
    assert "E = G" in choice["edit_reason"] and "step 2 " in choice["edit_reason"]


@pytest.mark.parametrize("seed", range(20))
def test_edit_is_at_or_after_guidance_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    steps = sorted(rng.choice(np.arange(1, 1000), size=int(rng.integers(1, 8)), replace=False))
    scores = table(*[(int(s), float(rng.random()), float(rng.random())) for s in steps])
    choice = choose_pair(scores, float(rng.random()), tolerance=float(rng.random()))
    assert choice["edit_step"] >= choice["guidance_step"]
    later = [r["subject_fidelity"] for r in choice["scores"] if r["step"] >= choice["guidance_step"]]
    edit_row = next(r for r in choice["scores"] if r["step"] == choice["edit_step"])
    assert edit_row["subject_fidelity"] == max(later)


def test_negative_base_uses_relative_magnitude():
    scores = table((1, -0.105, 0.1), (2, -0.2, 0.2))
    choice = choose_pair(scores, base_prompt_fidelity=-0.1, tolerance=0.1)
    assert choice["threshold"] == pytest.approx(-0.11) and choice["guidance_step"] == 1


def test_single_checkpoint():
    choice = choose_pair(table((400, 0.2, 0.5)), 0.3)
    assert choice["guidance_step"] == choice["edit_step"] == 400


def test_extra_keys_are_kept():
    scores = [{**row, "num_images": 4} for row in TYPICAL]
    assert choose_pair(scores, 0.3)["scores"][0]["num_images"] == 4


@pytest.mark.parametrize("scores, message", [
    ([], "at least one"),
    ([{"prompt_fidelity": 0.1, "subject_fidelity": 0.1}], "step"),
    ([{"step": 1, "prompt_fidelity": 0.1}], "subject_fidelity"),
    ([{"step": 1, "prompt_fidelity": math.nan, "subject_fidelity": 0.1}], "finite"),
    ([{"step": -1, "prompt_fidelity": 0.1, "subject_fidelity": 0.1}], "step"),
    (table((1, 0.1, 0.1), (1, 0.2, 0.2)), "twice"),
])
def test_bad_score_tables(scores, message):
    with pytest.raises(ValueError, match=message):
        validate_scores(scores)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tolerance"):
        choose_pair(TYPICAL, 0.3, tolerance=1.5)
    with pytest.raises(ValueError, match="base_prompt_fidelity"):
        choose_pair(TYPICAL, math.inf)


# ------------------------------------------------------------------ scoring hook

class FakeSampler:
    """Records calls; image brightness encodes the pair (a step number) so scores can be checked."""

    def __init__(self):
        self.calls = []

    def sample(self, pair, prompts, seeds, config):
        self.calls.append((pair, list(prompts), list(seeds), config))
        images = [Image.new("L", (8, 8), int(pair)) for _ in prompts]
        return SimpleNamespace(images=images)


def brightness_scorer(images, plain_prompts):
    value = float(np.mean([np.asarray(im).mean() for im in images]))
    return {"prompt_fidelity": 1.0 - value / 255.0, "subject_fidelity": value / 255.0}


def test_score_checkpoints_with_a_fake_sampler():
    sampler, released = FakeSampler(), []
    config = SamplingConfig(num_inference_steps=3, alpha=0.4)
    rows = score_checkpoints(sampler, lambda step: step, [10, 200], ["a sks toy", "a sks toy in snow"],
                             ["a toy", "a toy in snow"], [0, 1, 2], brightness_scorer, config,
                             release=released.append, progress=False)
    assert [r["step"] for r in rows] == [10, 200] and released == [10, 200]
    assert rows[1]["subject_fidelity"] == pytest.approx(200 / 255)
    assert all(r["num_images"] == 6 for r in rows)
    _, prompts, seeds, used = sampler.calls[0]
    assert prompts == ["a sks toy"] * 3 + ["a sks toy in snow"] * 3 and seeds == [0, 1, 2] * 2
    assert used.alpha == 0.0 and used.num_inference_steps == 3  # plain sampling of the checkpoint
    choice = choose_pair(rows, base_prompt_fidelity=1.0, tolerance=0.5)
    assert choice["guidance_step"] == 10 and choice["edit_step"] == 200


def test_score_model_checks_the_scorer_and_inputs():
    with pytest.raises(ValueError, match="subject_fidelity"):
        score_model(FakeSampler(), 1, ["p"], ["p"], [0], lambda i, p: {"prompt_fidelity": 1.0})
    with pytest.raises(ValueError, match="same length"):
        score_model(FakeSampler(), 1, ["p"], [], [0], brightness_scorer)
    with pytest.raises(ValueError, match="seed"):
        score_model(FakeSampler(), 1, ["p"], ["p"], [], brightness_scorer)


@pytest.mark.slow
def test_score_checkpoints_with_the_real_sampler(tiny_components):
    """The hook drives the DreamBlend sampler on the tiny model (G == E: plain sampling)."""
    from dreamblend_ray.method.pair import single
    from dreamblend_ray.method.sampler import DreamBlendSampler

    seen = []

    def scorer(images, plain):
        seen.append((len(images), plain))
        return brightness_scorer(images, plain)

    rows = score_checkpoints(DreamBlendSampler(tiny_components), lambda step: single(tiny_components.unet),
                             [1, 2], ["a sks dog"], ["a dog"], [0, 1], scorer,
                             SamplingConfig(num_inference_steps=2), progress=False)
    assert seen == [(2, ["a dog", "a dog"])] * 2
    # Same weights and seeds for both "checkpoints": identical scores (sampling is deterministic).
    assert rows[0]["prompt_fidelity"] == rows[1]["prompt_fidelity"]


@pytest.mark.slow
def test_embedded_scorer_on_rendered_subject_images():
    subjects = pytest.importorskip("dreamblend_ray.embedded.subjects")
    pytest.importorskip("dreamblend_ray.embedded.metrics")
    from dreamblend_ray.embedded.scorer import EmbeddedScorer

    subject = subjects.SUBJECTS[0]
    images = subject.instance_images()
    scorer = EmbeddedScorer(images)
    own = scorer(images, [f"a {subject.class_noun} on a {subject.background} background"] * len(images))
    assert own["prompt_fidelity"] == pytest.approx(1.0) and own["subject_fidelity"] > 0.8
    other = subject.new_backgrounds()[0]
    asked = scorer(images, [f"a {subject.class_noun} on a {other} background"] * len(images))
    assert asked["prompt_fidelity"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no attribute"):
        scorer(images, ["a sks thing"] * len(images))
