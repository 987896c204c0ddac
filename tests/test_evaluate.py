"""The evaluation job end to end on the tiny model: a subject fine-tuned for a few steps, tiny
random CLIP and ViT scorers, scores that agree with an independent computation."""

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamblend_ray.evaluation import protocol as benchmark

from dreamblend_ray.evaluation import metrics

from dreamblend_ray.io import storage
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.jobs.evaluate import EvalConfig, markdown_table, run_evaluation, subject_tasks, summarize

SEEDS = (0, 1)
CONFIG = EvalConfig(alphas=(0.5,), seeds=SEEDS, num_prompts=1, grid_prompts=2,
                    sampling=SamplingConfig(num_inference_steps=2, guidance_scale=2.0, step_size=20.0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fine-tuned tiny subject (LoRA, checkpoints at steps 2 and 6), its images, and scorers."""
    from dreamblend_ray.config import FinetuneConfig
    from dreamblend_ray.training.finetune import finetune_subject

    root = tmp_path_factory.mktemp("eval")
    image_dir = root / "images"
    image_dir.mkdir()
    for i in range(3):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[6 + i:22 + i, 8:24] = (220, 40, 40)
        Image.fromarray(pixels).save(image_dir / f"{i}.png")
    config = FinetuneConfig(steps=6, checkpoint_steps=(2, 6), learning_rate=5e-2, prior_preservation=False,
                            guidance_step=2, device="cpu")
    manifest = finetune_subject("tiny", sorted(str(p) for p in image_dir.iterdir()), "toy", "toy1", str(root / "ckpt"), config,
                                progress=False)
    subjects = root / "subjects.jsonl"
    benchmark.write_subjects(str(subjects), [benchmark.EvalSubject("toy1", "toy", "object", str(image_dir))])
    return {"root": root, "ckpt": str(root / "ckpt"), "subjects": str(subjects), "images": str(image_dir),
            "manifest": manifest, "clip": str(metrics.save_tiny_clip(root / "clip")),
            "dino": str(metrics.save_tiny_dino(root / "dino"))}


@pytest.fixture(scope="module")
def inline_run(setup):
    output = str(setup["root"] / "out-inline")
    report = run_evaluation(setup["subjects"], setup["ckpt"], output, setup["clip"], setup["dino"],
                            base="tiny", config=CONFIG, use_ray=False, device="cpu")
    return output, report, pq.read_table(storage.join(output, "scores.parquet")).to_pylist()


def read_image(uri):
    return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")


# ------------------------------------------------------------------ units

def test_eval_config_validation():
    assert [m for m, _ in CONFIG.methods()] == ["guidance", "edit", "dreamblend"]
    for kwargs, message in (({"alphas": ()}, "alphas"), ({"alphas": (0.0,)}, "alphas"),
                            ({"seeds": (1, 1)}, "distinct"), ({"num_prompts": 26}, "num_prompts"),
                            ({"edit_step": -1}, "edit_step")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(**kwargs)
    json.dumps(CONFIG.to_json())


def test_subject_tasks_use_the_manifest_unless_overridden():
    subject = benchmark.EvalSubject("dog", "dog", "live", "/d")
    tasks = subject_tasks(subject, {"token": "zwx", "guidance_step": 100, "edit_step": 400},
                          EvalConfig(num_prompts=2))
    assert [t["prompt"] for t in tasks] == ["a zwx dog in the jungle", "a zwx dog in the snow"]
    assert [t["plain_prompt"] for t in tasks] == ["a dog in the jungle", "a dog in the snow"]
    assert {(t["guidance_step"], t["edit_step"]) for t in tasks} == {(100, 400)}
    override = EvalConfig(guidance_step=50, edit_step=60, num_prompts=1)
    assert subject_tasks(subject, {"token": "zwx", "guidance_step": 100, "edit_step": 400},
                         override)[0]["guidance_step"] == 50
    with pytest.raises(ValueError, match="guidance_step"):
        subject_tasks(subject, {"token": "zwx"}, CONFIG)


def test_summary_and_markdown_table():
    rows = [{"subject_id": "a", "prompt_index": p, "method": m, "alpha": a, "seed": s, "dino": 0.5,
             "clip_i": 0.6, "clip_t": 0.2 + p, "diversity": 0.1 * (p + 1)}
            for m, a in (("dreamblend", 0.5), ("edit", 0.0)) for p in (0, 1) for s in (0, 1)]
    summary = summarize(rows)
    assert [r["method"] for r in summary] == ["edit", "dreamblend"]
    assert summary[0]["clip_t"] == pytest.approx(0.7) and summary[0]["diversity"] == pytest.approx(0.15)
    assert summary[0]["images"] == 4
    table = markdown_table(summary, title="All")
    assert "| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | Diversity ↑ | Images |" in table
    assert "| DreamBlend (alpha=0.5) | 0.500 | 0.600 | 0.700 | 0.150 | 4 |" in table
    single_seed = [dict(r, diversity=math.nan) for r in rows]
    assert "n/a" in markdown_table(summarize(single_seed))


def test_missing_models_and_subjects_are_clear_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="--clip-model"):
        run_evaluation(setup["subjects"], setup["ckpt"], str(tmp_path), None, setup["dino"], base="tiny",
                       use_ray=False)
    with pytest.raises(ValueError, match="--dino-model"):
        run_evaluation(setup["subjects"], setup["ckpt"], str(tmp_path), setup["clip"], str(tmp_path / "x"),
                       base="tiny", use_ray=False)
    with pytest.raises(ValueError, match="no subject.json"):
        run_evaluation(setup["subjects"], str(tmp_path), str(tmp_path), setup["clip"], setup["dino"],
                       base="tiny", use_ray=False)


def test_cli_reports_a_missing_model_option(setup, tmp_path, caplog):
    from dreamblend_ray.cli import main

    code = main(["evaluate", "--subjects", setup["subjects"], "--checkpoints", setup["ckpt"],
                 "--output", str(tmp_path), "--dino-model", setup["dino"], "--no-ray", "--base", "tiny"])
    assert code == 2 and "--clip-model is required" in caplog.text


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_inline_run_writes_tables_grids_and_consistent_scores(setup, inline_run):
    output, report, rows = inline_run
    methods = CONFIG.methods()
    assert len(rows) == 1 * 1 * len(SEEDS) * len(methods)
    assert {(r["method"], r["alpha"]) for r in rows} == set(methods)
    assert {(r["guidance_step"], r["edit_step"]) for r in rows} == {(2, 6)}
    for r in rows:
        for key in ("dino", "clip_i", "clip_t"):
            assert -1.0 - 1e-5 <= r[key] <= 1.0 + 1e-5
        assert r["diversity"] >= -1e-6 and "sks" not in r["plain_prompt"] and "sks" in r["prompt"]
    # Scores agree with an independent computation from the saved images.
    clip, dino = metrics.load_clip(setup["clip"]), metrics.load_dino(setup["dino"])
    real = benchmark.load_images(setup["images"])
    row = next(r for r in rows if r["method"] == "dreamblend" and r["seed"] == 1)
    image = [read_image(row["image_uri"])]
    assert row["clip_i"] == pytest.approx(metrics.clip_i(clip, image, real), abs=1e-4)
    assert row["dino"] == pytest.approx(metrics.dino(dino, image, real), abs=1e-4)
    assert row["clip_t"] == pytest.approx(metrics.clip_t(clip, image, [row["plain_prompt"]]), abs=1e-4)
    group = [read_image(r["image_uri"]) for r in rows
             if r["method"] == "dreamblend" and r["prompt_index"] == row["prompt_index"]]
    assert row["diversity"] == pytest.approx(metrics.diversity(dino, group), abs=1e-4)
    # The methods really use different models: G alone, E alone and DreamBlend images differ.
    by_method = {m: np.asarray(read_image(next(r["image_uri"] for r in rows if r["method"] == m
                                              and r["seed"] == 0 and r["prompt_index"] == 0)), float)
                 for m in ("guidance", "edit", "dreamblend")}
    assert np.abs(by_method["guidance"] - by_method["edit"]).mean() > 0
    assert np.abs(by_method["dreamblend"] - by_method["edit"]).mean() > 0
    # The table, the summary and the grid.
    table = storage.read_text(storage.join(output, "results.md"))
    assert "DreamBlend (alpha=0.5)" in table and "Subject toy1 (G = step 2, E = step 6)" in table
    assert [r["method"] for r in report["summary"]] == ["guidance", "edit", "dreamblend"]
    assert json.loads(storage.read_text(storage.join(output, "summary.json")))["subjects"] == ["toy1"]
    grid = read_image(storage.join(output, "grids", "toy1.png"))
    assert grid.size[1] == 3 * 96 and grid.size[0] > 96


@pytest.mark.slow
def test_ray_data_run_matches_the_inline_run(setup, inline_run, ray_local, s3_bucket):
    """The Ray Data job writes to s3 and gives the same scores as the inline run (determinism)."""
    output = f"{s3_bucket}/eval"
    run_evaluation(setup["subjects"], setup["ckpt"], output, setup["clip"], setup["dino"], base="tiny",
                   config=CONFIG, use_ray=True, actors=1, device="cpu")
    ray_rows = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, "scores.parquet")))).to_pylist()
    inline_rows = inline_run[2]
    assert len(ray_rows) == len(inline_rows)
    for a, b in zip(ray_rows, inline_rows):
        assert (a["method"], a["alpha"], a["prompt_index"], a["seed"]) == \
               (b["method"], b["alpha"], b["prompt_index"], b["seed"])
        for key in ("dino", "clip_i", "clip_t", "diversity"):
            # float noise only (torch threading differs between processes)
            assert a[key] == pytest.approx(b[key], abs=5e-3)
    assert storage.exists(storage.join(output, "grids", "toy1.png"))


# ------------------------------------------------------------------ automatic pair choice

@pytest.mark.slow
def test_choose_and_record_writes_the_pair_into_the_manifest(setup, tmp_path):
    from dreamblend_ray.training import checkpoints, layout
    from dreamblend_ray.models.components import load_components
    from dreamblend_ray.evaluation.pair_choice import choose_and_record, choose_pair

    root = str(tmp_path / "ckpt")
    storage.copy_dir(setup["ckpt"], root)
    components = load_components("tiny", device="cpu")
    scorer = metrics.ClipDinoScorer(metrics.load_clip(setup["clip"]), metrics.load_dino(setup["dino"]),
                                    benchmark.load_images(setup["images"]))
    prompts, plain = benchmark.prompts_for("object", "toy", "sks", limit=2)
    manifest = choose_and_record(root, "toy1", components, scorer, prompts, plain, [0],
                                 SamplingConfig(num_inference_steps=2), tolerance=0.5, progress=False)
    choice = manifest["pair_choice"]
    assert [r["step"] for r in choice["scores"]] == [2, 6]
    expected = choose_pair(choice["scores"], choice["base_scores"]["prompt_fidelity"], 0.5)
    assert (choice["guidance_step"], choice["edit_step"]) == (expected["guidance_step"], expected["edit_step"])
    stored = layout.read_manifest(root, "toy1")
    assert stored["pair_choice"] == json.loads(json.dumps(choice))
    assert (stored["guidance_step"], stored["edit_step"]) == (choice["guidance_step"], choice["edit_step"])
    assert not (getattr(components.unet, "peft_config", None) or {})  # adapters unloaded again
    pair, _ = checkpoints.load_pair(root, "toy1", components)  # the recorded pair is the default
    assert pair.meta["guidance_step"] == choice["guidance_step"]
