"""The demo's plumbing end to end on the tiny model: Ray Data fine-tuning, Serve over HTTP,
grid and report; a second run reuses the finished subjects. (The embedded model's numbers are
the demo's own business; here the pipeline is what is tested.)"""

import json

import pytest
from PIL import Image

from dreamblend_ray.demo import COLUMNS, DemoConfig, run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_subjects(tmp_path):
    config = DemoConfig(out=str(tmp_path / "demo"), base="tiny", subjects=("striped-star", "half-ring"),
                        finetune_steps=3, steps=3, seeds=(0, 1), contexts_per_subject=1, actors=2,
                        extra_finetune={"prior_preservation": False, "num_class_images": 0})
    table = run_demo(config)
    assert set(table) == set(COLUMNS)
    assert all(row["images"] == 2 * 2 for row in table.values())
    grid = Image.open(tmp_path / "demo" / "grid.png")
    assert grid.height > 2 * 128 and grid.width > 4 * 128
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| DreamBlend |" in report and report.count("| succeeded |") == 2
    first = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    run_demo(config)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert report.count("| skipped |") == 2
    second = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert second["columns"] == first["columns"]  # same subjects, seeds and settings: same images
    changed = DemoConfig(**{**config.__dict__, "finetune_steps": 4})
    run_demo(changed)  # other settings: the stored subjects are stale and are fine-tuned again
    report = (tmp_path / "demo" / "report.md").read_text()
    assert report.count("| succeeded |") == 2


def test_demo_prompts_add_a_second_object_by_default():
    from dreamblend_ray.demo import request_body, requests_for
    from dreamblend_ray.embedded import metrics
    from dreamblend_ray.embedded.subjects import SUBJECTS

    config = DemoConfig()
    cells = requests_for(config, SUBJECTS)
    assert len(cells) == len(SUBJECTS) * config.contexts_per_subject * len(COLUMNS)
    for cell in cells:
        spec = metrics.parse_prompt(cell.prompt)
        subject = next(s for s in SUBJECTS if s.subject_id == cell.subject_id)
        assert spec.background == subject.background and len(spec.named_objects) == 1
    blend = request_body(config, next(c for c in cells if c.column == "DreamBlend"), {})
    assert blend["alpha"] == config.alpha and blend["guidance_steps"] == round(0.6 * config.steps)
    backgrounds = requests_for(DemoConfig(context="background"), SUBJECTS[:1])
    assert all(not metrics.parse_prompt(c.prompt).named_objects for c in backgrounds)


@pytest.mark.parametrize("field, value", [("context", "sky"), ("contexts_per_subject", 0),
                                          ("guidance_fraction", 1.5)])
def test_demo_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value})
