"""The demo's plumbing end to end on the tiny model: Ray Data fine-tuning, Serve over HTTP,
grid and report; a second run reuses the finished subjects. (The embedded model's numbers are
the demo's own business; here the pipeline is what is tested.)"""

import json

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.demo import COLUMNS, DemoConfig, run_demo


def _runs(line) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _grid_shape(grid: Image.Image) -> tuple[int, int]:
    """(rows, columns) of the tiles of a heat-map grid, read off its pixels: the runs of non-white
    down the last column (a heat map, never white; right of its title), then across the bottom
    third of the first row (below its label)."""
    ink = (np.asarray(grid.convert("RGB")) < 250).any(axis=2)
    rows = _runs(ink[:, -10])
    top, bottom = rows[0]
    return len(rows), len(_runs(ink[bottom - (bottom - top) // 3:bottom].any(axis=0)))


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
    for subject_id in config.subjects:  # heat maps over HTTP, and the fine-tune job's collapse probe
        words = json.loads((tmp_path / "demo" / f"attention-{subject_id}.json").read_text())["words"]
        rows, columns = _grid_shape(Image.open(tmp_path / "demo" / f"attention-{subject_id}.png"))
        assert len(words) >= 4 and (rows, columns) == (3, 1 + len(words))  # G / E / DreamBlend; image + words
        assert f"(attention-{subject_id}.png)" in report and f"(collapse-{subject_id}.png)" in report
        assert Image.open(tmp_path / "demo" / f"collapse-{subject_id}.png").width > 0
    assert report.count("Attention probe: collapse") == 2
    first = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    run_demo(config)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert report.count("| skipped |") == 2
    second = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert second["columns"] == first["columns"]  # same subjects, seeds and settings: same images
    # The probe and the heat maps were checked above; off here, where only re-training is tested (saves ~10 s).
    changed = DemoConfig(**{**config.__dict__, "finetune_steps": 4, "attention_probe": False, "attention_maps": False})
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
                                          ("guidance_fraction", 1.5), ("method", "dora"),
                                          ("learning_rate", 2.0)])
def test_demo_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value})


def test_demo_fine_tunes_with_lora_by_default_and_keeps_the_full_recipe():
    from dreamblend_ray.demo import finetune_config
    from dreamblend_ray.embedded.subjects import SUBJECTS

    lora = finetune_config(DemoConfig(), SUBJECTS)
    assert (lora.method, lora.learning_rate, lora.rank) == ("lora", 2e-3, 16)
    assert "to_q" in lora.target_modules  # every attention projection, the grown 16x16 level's too
    full = finetune_config(DemoConfig(method="full"), SUBJECTS)
    assert (full.method, full.learning_rate) == ("full", 3e-4)
    assert finetune_config(DemoConfig(learning_rate=1e-3), SUBJECTS).learning_rate == 1e-3
