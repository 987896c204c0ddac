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
                        finetune_steps=3, steps=3, seeds=(0, 1), backgrounds_per_subject=1, actors=2,
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
