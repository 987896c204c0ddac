"""The demo's metrics.json and the recorded run it is held to (dreamblend_ray/demo_record.py).

The recorded file is the README's demo run; these tests check that it is what the demo writes
(its figures are the means of its per-image scores, its settings are the demo's defaults), that
the tolerance lets a few images change and catches a sampler whose guidance stopped working, and,
with ``DREAMBLEND_DEMO_CHECK=1`` (``make test-demo``, about 8 minutes on 2 cores), that a fresh
``run_demo`` at the defaults reproduces it.
"""

import copy
import os

import numpy as np
import pytest

from dreamblend_ray import demo_record
from dreamblend_ray.demo import COLUMNS, Cell, DemoConfig, column_metrics, demo_settings, run_demo
from dreamblend_ray.embedded import subjects
from test_embedded import star_with_and_without_companion

RECORDED = demo_record.read_recorded()


def test_seed_figures_split_cell_by_cell_images_by_seed():
    # two cells of three seeds each: images ordered cell by cell, seed by seed
    prompt = [1.0, 0.0, 0.5, 1.0, 1.0, 0.5]
    subject = [0.2, 0.4, 0.6, 0.4, 0.6, 0.8]
    got = demo_record.seed_figures(prompt, subject, seeds=(7, 8, 9))
    assert got["per_seed"]["7"] == {"prompt_fidelity": 1.0, "subject_fidelity": 0.3}
    assert got["per_seed"]["9"] == {"prompt_fidelity": 0.5, "subject_fidelity": 0.7}
    assert got["range"] == {"prompt_fidelity": [0.5, 1.0], "subject_fidelity": [0.3, 0.7]}
    with pytest.raises(ValueError, match="do not split into 4 seeds"):
        demo_record.seed_figures(prompt, subject, seeds=(0, 1, 2, 3))


def test_tolerance_is_flips_over_the_sample_size():
    column = {"per_image": {"prompt": [0.0, 0.5, 1.0] * 9, "subject": [0.2, 0.5] * 13 + [0.35]}}
    assert demo_record.tolerance(column, "prompt_fidelity") == pytest.approx(demo_record.FLIPS / 27)
    assert demo_record.tolerance(column, "subject_fidelity") == pytest.approx(demo_record.FLIPS * 0.3 / 27)
    # twice the images, half the tolerance
    doubled = {"per_image": {k: v * 2 for k, v in column["per_image"].items()}}
    assert demo_record.tolerance(doubled, "prompt_fidelity") == pytest.approx(demo_record.FLIPS / 54)


def test_column_metrics_record_per_image_scores_that_make_the_figures():
    subject, prompt, images = star_with_and_without_companion()
    config = DemoConfig(seeds=(0, 1, 2))
    cells = [Cell(subject.subject_id, prompt, column) for column in COLUMNS]
    table = column_metrics(config, [subject], cells, {cell: images for cell in cells})
    row = table["G alone"]
    assert row["per_image"]["prompt"] == [1.0, 0.0, 1.0]
    assert row["prompt_fidelity"] == pytest.approx(2 / 3, abs=1e-4)
    assert row["subject_fidelity"] == pytest.approx(np.mean(row["per_image"]["subject"]), abs=1e-4)
    assert row["seeds"]["per_seed"]["1"]["prompt_fidelity"] == 0.0


@pytest.mark.skipif(RECORDED is None, reason="no recorded demo run ships")
def test_the_recorded_run_is_the_demo_at_its_defaults():
    assert RECORDED["settings"] == demo_settings(DemoConfig())
    n = len(DemoConfig().seeds) * DemoConfig().contexts_per_subject * len(subjects.SUBJECTS)
    assert list(RECORDED["columns"]) == list(COLUMNS)
    for column in RECORDED["columns"].values():
        assert column["images"] == n == len(column["per_image"]["prompt"]) == len(column["per_image"]["subject"])
        for figure, (key, _) in demo_record.FIGURES.items():
            assert column[figure] == pytest.approx(np.mean(column["per_image"][key]), abs=2e-4)
            low, high = column["seeds"]["range"][figure]
            assert low <= column[figure] <= high


@pytest.mark.skipif(RECORDED is None, reason="no recorded demo run ships")
def test_a_few_changed_images_pass_and_guidance_that_stopped_working_fails():
    assert all(check.ok for check in demo_record.compare(RECORDED, RECORDED))
    # another machine: two of DreamBlend's images change their verdict
    other = copy.deepcopy(RECORDED)
    blend = other["columns"]["DreamBlend"]
    flips = [i for i, v in enumerate(blend["per_image"]["prompt"]) if v == 1.0][:2]
    assert len(flips) == 2
    for i in flips:
        blend["per_image"]["prompt"][i] = 0.0
    blend["prompt_fidelity"] = float(np.mean(blend["per_image"]["prompt"]))
    assert all(check.ok for check in demo_record.compare(other, RECORDED))
    # a regression: the guidance does nothing, so DreamBlend's column is E's images
    broken = copy.deepcopy(RECORDED)
    broken["columns"]["DreamBlend"] = copy.deepcopy(RECORDED["columns"]["E alone"])
    failed = [c for c in demo_record.compare(broken, RECORDED) if not c.ok]
    assert ("DreamBlend", "prompt_fidelity") in [(c.column, c.figure) for c in failed]
    assert {c.column for c in failed} == {"DreamBlend"}
    markdown = demo_record.comparison_markdown(broken, RECORDED)
    assert "does **not** reproduce it" in markdown and "| DreamBlend | prompt fidelity |" in markdown


@pytest.mark.skipif(RECORDED is None, reason="no recorded demo run ships")
def test_runs_with_other_settings_are_not_compared():
    other = copy.deepcopy(RECORDED)
    other["settings"]["alpha"] = 0.5
    with pytest.raises(ValueError, match=r"settings differ \(alpha\)"):
        demo_record.compare(other, RECORDED)
    assert "Not compared: the runs' settings differ (alpha)" in demo_record.comparison_markdown(other, RECORDED)
    assert "No recorded run ships" in demo_record.comparison_markdown(other, None)


@pytest.mark.skipif(os.environ.get("DREAMBLEND_DEMO_CHECK") != "1",
                    reason="the full demo (about 8 minutes on 2 cores): DREAMBLEND_DEMO_CHECK=1 or make test-demo")
def test_the_demo_reproduces_the_recorded_run(tmp_path):
    import json

    assert RECORDED is not None, "no recorded demo run ships"
    run_demo(DemoConfig(out=str(tmp_path / "demo")))
    run = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    failed = [check.line() for check in demo_record.compare(run, RECORDED) if not check.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(RECORDED is None, reason="no recorded demo run ships")
def test_the_readme_states_the_recorded_figures():
    from pathlib import Path

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    g, e, blend = (RECORDED["columns"][c] for c in COLUMNS)
    ranges = [c["seeds"]["range"]["prompt_fidelity"] for c in (g, e, blend)]
    prompt = (f"prompt fidelity (the second object drawn right) G {g['prompt_fidelity']:.2f} "
              f"({ranges[0][0]:.2f}-{ranges[0][1]:.2f}), E {e['prompt_fidelity']:.2f} "
              f"({ranges[1][0]:.2f}-{ranges[1][1]:.2f}), DreamBlend {blend['prompt_fidelity']:.2f} "
              f"({ranges[2][0]:.2f}-{ranges[2][1]:.2f})")
    subject = (f"subject fidelity G {g['subject_fidelity']:.3f}, E {e['subject_fidelity']:.3f}, "
               f"DreamBlend {blend['subject_fidelity']:.3f}")
    assert prompt in readme and subject in readme

