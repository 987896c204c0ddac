"""Automatic pair choice inside the fine-tuning job (tiny model, embedded analytic scorer)."""

import io

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.training import checkpoints, layout

from dreamblend_ray.io import storage
from dreamblend_ray.config import FinetuneConfig, to_dict
from dreamblend_ray.embedded import metrics, world
from dreamblend_ray.jobs.cli import finetune_parser as build_parser, pair_choice_from_args
from dreamblend_ray.jobs.finetune import FinetuneActor, run_finetune_job, subject_items
from dreamblend_ray.jobs.common import JobResources
from dreamblend_ray.jobs.manifests import SubjectSpec
from dreamblend_ray.embedded.scorer import embedded_prompts  # importing it registers the "embedded" scorer
from dreamblend_ray.evaluation.pair_choice import PairChoiceOptions

TINY_FINETUNE = FinetuneConfig(steps=4, checkpoint_steps=(2, 4), prior_preservation=False, rank=2, seed=0)
EMBEDDED = PairChoiceOptions("embedded", num_prompts=2, seeds=(0,), steps=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def subject_png(background="blue", colour="red", size=32) -> bytes:
    array = np.empty((size, size, 3), np.uint8)
    array[:] = world.PALETTE[background]
    array[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = world.PALETTE[colour]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def subject(tmp_path, subject_id="square") -> SubjectSpec:
    folder = tmp_path / "images" / subject_id
    for i in range(2):
        storage.write_bytes(str(folder / f"{i}.png"), subject_png())
    return SubjectSpec(subject_id, "shape", (str(folder),), {})


def test_embedded_prompts_avoid_the_instance_background():
    images = [Image.open(io.BytesIO(subject_png("blue")))]
    prompts, plain = embedded_prompts(images, "shape", "sks", 5, context="background")
    assert len(prompts) == 5 and not any("blue" in p for p in prompts)
    assert prompts[0] == "a sks shape on a red background" and plain[0] == "a shape on a red background"
    with pytest.raises(ValueError, match="num_prompts must be at most 5"):
        embedded_prompts(images, "shape", "sks", 6, context="background")


def test_embedded_prompts_add_a_second_object_in_a_free_colour():
    images = [Image.open(io.BytesIO(subject_png("blue", "red")))]
    prompts, plain = embedded_prompts(images, "shape", "sks", 8)
    assert len(set(prompts)) == 8 and [p.replace("sks ", "") for p in prompts] == plain
    for prompt in prompts:
        spec = metrics.parse_prompt(prompt)
        (shape, colour), = spec.named_objects
        assert spec.background == "blue" and colour not in ("blue", "red")
    with pytest.raises(ValueError, match="num_prompts must be at most 16"):
        embedded_prompts(images, "shape", "sks", 17)
    with pytest.raises(ValueError, match="context"):
        embedded_prompts(images, "shape", "sks", 1, context="sky")


@pytest.mark.parametrize("kwargs, message", [
    ({"scorer": "clip-dino"}, "--clip-model"),
    ({"scorer": "clip-dino", "clip_model": "/m/clip"}, "--dino-model"),
    ({"scorer": "clip"}, "scorer must be one of"),
    ({"num_prompts": 0}, "num_prompts"),
    ({"seeds": ()}, "seeds"),
    ({"tolerance": 2.0}, "tolerance"),
    ({"steps": 0}, "steps"),
    ({"context": "sky"}, "context"),
])
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PairChoiceOptions(**kwargs)


def test_cli_flags_parse():
    parser = build_parser()
    args = parser.parse_args(["--subjects", "s.jsonl", "--output", "out", "--choose-pair", "clip-dino",
                              "--clip-model", "s3://m/clip", "--dino-model", "/m/dino", "--choice-prompts", "3",
                              "--choice-tolerance", "0.2"])
    options = pair_choice_from_args(args)
    assert options == PairChoiceOptions("clip-dino", "s3://m/clip", "/m/dino", num_prompts=3, tolerance=0.2)
    assert pair_choice_from_args(parser.parse_args(["--subjects", "s", "--output", "o"])) is None
    with pytest.raises(ValueError, match="--clip-model"):
        pair_choice_from_args(parser.parse_args(["--subjects", "s", "--output", "o", "--choose-pair", "clip-dino"]))
    with pytest.raises(ValueError, match="need.* --choose-pair"):
        pair_choice_from_args(parser.parse_args(["--subjects", "s", "--output", "o", "--choice-prompts", "2"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--subjects", "s", "--output", "o", "--choose-pair", "clip"])
    background = pair_choice_from_args(parser.parse_args(["--subjects", "s", "--output", "o", "--choose-pair",
                                                          "embedded", "--choice-context", "background"]))
    assert background.context == "background" and PairChoiceOptions().context == "companion"


def test_job_records_the_chosen_pair(tmp_path, ray_local, tiny_components):
    output = str(tmp_path / "out")
    result = run_finetune_job([subject(tmp_path)], output, base="tiny", config=TINY_FINETUNE,
                              resources=JobResources(num_actors=1, cpus_per_actor=1, torch_threads=1),
                              pair_choice=EMBEDDED)
    (row,) = result.rows
    assert row["status"] == "succeeded", row["error"]
    manifest = layout.read_manifest(output, "square")
    choice = manifest["pair_choice"]
    assert choice["guidance_step"] == manifest["guidance_step"] == row["guidance_step"]
    assert choice["edit_step"] == manifest["edit_step"] == row["edit_step"]
    assert {manifest["guidance_step"], manifest["edit_step"]} <= set(manifest["steps"])
    assert manifest["edit_step"] >= manifest["guidance_step"] and choice["edit_reason"]
    assert [r["step"] for r in choice["scores"]] == manifest["steps"] == [2, 4]
    assert choice["options"]["scorer"] == "embedded" and len(choice["prompts"]) == 2
    specs = [metrics.parse_prompt(p) for p in choice["prompts"]]  # second objects in colours free of the subject
    assert all(s.background == "blue" and s.named_objects[0][1] not in ("blue", "red") for s in specs)
    assert storage.read_json(storage.join(output, "runs", result.run_id, "job.json"))["pair_choice"]["num_prompts"] == 2

    pair, _ = checkpoints.load_pair(output, "square", tiny_components)
    try:
        assert (pair.meta["guidance_step"], pair.meta["edit_step"]) == (choice["guidance_step"], choice["edit_step"])
    finally:
        checkpoints.unload_pair(pair, tiny_components)

    # A rerun finds the choice recorded: nothing to do.
    again = run_finetune_job([subject(tmp_path)], output, base="tiny", config=TINY_FINETUNE, pair_choice=EMBEDDED)
    assert [r["status"] for r in again.rows] == ["skipped"]


def test_scoring_failure_keeps_the_checkpoints_and_a_rerun_only_scores(tmp_path):
    output = str(tmp_path / "out")
    (item,) = subject_items([subject(tmp_path, "ring")], TINY_FINETUNE)
    missing = PairChoiceOptions("clip-dino", str(tmp_path / "no-clip"), str(tmp_path / "no-dino"), num_prompts=1,
                                seeds=(0,), steps=2)
    actor = FinetuneActor("tiny", output, 1, False, pair_choice=to_dict(missing))
    row = actor.run_one(item)
    assert row["status"] == "failed"
    assert "pair choice failed" in row["error"] and "--clip-model" in row["error"]
    manifest = layout.read_manifest(output, "ring")  # the fine-tuning's manifest stays valid
    assert "pair_choice" not in manifest and row["guidance_step"] == manifest["guidance_step"]
    assert not getattr(actor.components.unet, "peft_config", None)
    weights = storage.read_bytes(layout.weight_uri(output, "ring", 4, "lora"))

    actor.pair_choice = EMBEDDED
    row = actor.run_one(item)
    assert row["status"] == "succeeded", row["error"]
    manifest = layout.read_manifest(output, "ring")
    assert manifest["pair_choice"]["edit_step"] == manifest["edit_step"] == row["edit_step"]
    assert manifest["loss_curve"] and storage.read_bytes(
        layout.weight_uri(output, "ring", 4, "lora")) == weights
