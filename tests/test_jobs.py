"""The Ray Data jobs and their manifests: S3 over HTTP (moto) and a local Ray cluster.

The job tests share one module fixture run (two good subjects and a corrupt one fine-tuned in
parallel into S3); the tiny model and a few fine-tune/sampling steps keep each job to seconds.
"""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamblend_ray import checkpoints, storage
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.job_common import JobResources, read_parquet
from dreamblend_ray.manifests import (GenerationRequest, SubjectSpec, apply_overrides, read_requests,
                                      read_subjects)

TINY_FINETUNE = FinetuneConfig(steps=4, checkpoint_steps=(2, 4), prior_preservation=False, rank=2, seed=0)
TWO_ACTORS = JobResources(num_actors=2, cpus_per_actor=1, torch_threads=1)


def png(color, size=32) -> bytes:
    array = np.zeros((size, size, 3), np.uint8)
    array[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(uri: str, rows: list[dict]) -> str:
    storage.write_text(uri, "\n".join(json.dumps(r) for r in rows) + "\n")
    return uri


def upload_subject_images(root: str) -> None:
    for name, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for i in range(2):
            storage.write_bytes(storage.join(root, "images", name, f"{i}.png"), png(color))
    storage.write_bytes(storage.join(root, "images", "broken", "0.png"), b"\x89PNG definitely not an image")


# --------------------------------------------------------------------------- manifests (no Ray)

def test_subjects_manifest_resolves_relative_images_and_overrides(tmp_path):
    uri = write_jsonl(str(tmp_path / "m" / "subjects.jsonl"), [
        {"subject_id": "a", "class_noun": "dog", "images": ["imgs/0.png", "/abs/1.png"],
         "finetune": {"steps": 7, "checkpoint_steps": [3, 7]}},
        {"subject_id": "b", "class_noun": "cat", "images": "s3://bucket/cats/"},
    ])
    a, b = read_subjects(uri)
    assert a.images == (str(tmp_path / "m" / "imgs" / "0.png"), "/abs/1.png")
    assert b.images == ("s3://bucket/cats/",)
    config = apply_overrides(FinetuneConfig(), a.overrides)
    assert config.steps == 7 and config.checkpoint_steps == (3, 7)


def test_subjects_manifest_reads_parquet(tmp_path):
    table = pa.Table.from_pylist([{"subject_id": "p1", "class_noun": "vase", "images": ["s3://b/v.png"],
                                   "finetune": json.dumps({"rank": 8})}])
    pq.write_table(table, tmp_path / "subjects.parquet")
    (spec,) = read_subjects(str(tmp_path / "subjects.parquet"))
    assert spec == SubjectSpec("p1", "vase", ("s3://b/v.png",), {"rank": 8})


@pytest.mark.parametrize("row, message", [
    ({"subject_id": "../etc", "class_noun": "dog", "images": ["x.png"]}, "subject_id must match"),
    ({"subject_id": "a", "class_noun": "dog"}, r"missing field\(s\) \['images'\]"),
    ({"subject_id": "a", "class_noun": "dog", "images": []}, "images must be a non-empty list"),
    ({"subject_id": "a", "class_noun": "dog", "images": ["x.png"], "colour": 1}, "unknown field"),
    ({"subject_id": "a", "class_noun": "dog/..", "images": ["x.png"]}, "class_noun"),
])
def test_bad_subject_rows_name_the_row_and_field(tmp_path, row, message):
    uri = write_jsonl(str(tmp_path / "s.jsonl"), [{"subject_id": "ok", "class_noun": "dog", "images": ["y.png"]}, row])
    with pytest.raises(ValueError, match=message) as info:
        read_subjects(uri)
    assert "s.jsonl row 2" in str(info.value)


def test_duplicate_subjects_and_bad_overrides_are_rejected(tmp_path):
    row = {"subject_id": "a", "class_noun": "dog", "images": ["x.png"]}
    with pytest.raises(ValueError, match="row 2: duplicate subject_id 'a'"):
        read_subjects(write_jsonl(str(tmp_path / "d.jsonl"), [row, row]))
    with pytest.raises(ValueError, match="unknown finetune setting"):
        apply_overrides(FinetuneConfig(), {"stepz": 3})
    with pytest.raises(ValueError, match="steps must be"):
        apply_overrides(FinetuneConfig(), {"steps": 0})


def test_requests_are_validated_against_sampling_config(tmp_path):
    good = {"subject_id": "a", "prompt": "a photo of sks dog", "seed": 3, "num_images": 2,
            "settings": {"alpha": 0.1, "layers": {"num_lowest": 1}}}
    (request,) = read_requests(write_jsonl(str(tmp_path / "r.jsonl"), [good]))
    assert request.seeds == [3, 4] and request.row == 0
    bad = dict(good, settings={"alpha": -1})
    with pytest.raises(ValueError, match="r2.jsonl row 2: alpha must be in"):
        read_requests(write_jsonl(str(tmp_path / "r2.jsonl"), [good, bad]))
    with pytest.raises(ValueError, match="num_images must be in"):
        read_requests(write_jsonl(str(tmp_path / "r3.jsonl"), [dict(good, num_images=0)]))
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        read_requests(write_jsonl(str(tmp_path / "r4.jsonl"), [dict(good, prompt="  ")]))


def test_generation_groups_one_task_per_subject_and_batches_by_settings():
    from dreamblend_ray.generate_job import group_tasks, sampler_batches

    requests = [GenerationRequest(0, "a", "p0", num_images=3), GenerationRequest(1, "b", "p1"),
                GenerationRequest(2, "a", "p2", settings={"alpha": 0.0}),
                GenerationRequest(3, "a", "p3", num_images=2)]
    tasks = group_tasks(requests, max_images_per_task=256)
    assert [t["subject_id"] for t in tasks] == ["a", "b"]
    batches = sampler_batches(json.loads(tasks[0]["requests"]), batch_size=4)
    assert [[(r["row"], k) for r, k in b] for b in batches] == [[(0, 0), (0, 1), (0, 2), (3, 0)], [(3, 1)], [(2, 0)]]
    split = group_tasks(requests, max_images_per_task=3)
    assert [(t["subject_id"], [r["row"] for r in json.loads(t["requests"])]) for t in split] == [
        ("a", [0]), ("a", [2, 3]), ("b", [1])]


def test_job_cli_rejects_bad_input_before_starting_ray(tmp_path, s3_server):
    from dreamblend_ray.finetune_job import main

    manifest = write_jsonl(str(tmp_path / "s.jsonl"), [{"subject_id": "a b", "class_noun": "dog", "images": ["x.png"]}])
    assert main(["--subjects", manifest, "--output", str(tmp_path / "out"), "--base", "tiny"]) == 2
    good = write_jsonl(str(tmp_path / "g.jsonl"), [{"subject_id": "a", "class_noun": "dog", "images": ["x.png"]}])
    assert main(["--subjects", good, "--output", "s3://no-such-bucket-dreamblend/out", "--base", "tiny"]) == 2
    assert main(["--subjects", good, "--output", str(tmp_path / "out"), "--config-json", '{"rank": 0}']) == 2


def test_generate_cli_rejects_bad_input_before_starting_ray(tmp_path):
    from dreamblend_ray.generate_job import main

    requests = write_jsonl(str(tmp_path / "r.jsonl"), [{"subject_id": "a", "prompt": "p", "settings": {"alpha": 99}}])
    assert main(["--requests", requests, "--output", str(tmp_path / "out"), "--base", "tiny"]) == 2
    requests = write_jsonl(str(tmp_path / "ok.jsonl"), [{"subject_id": "a", "prompt": "p"}])
    assert main(["--requests", requests, "--output", str(tmp_path / "out"), "--base", "tiny", "--steps", "0"]) == 2
    assert main(["--requests", requests, "--output", str(tmp_path / "out"), "--base", "nope"]) == 2


# --------------------------------------------------------------------------- jobs on Ray + S3

@pytest.fixture(scope="module")
def finetuned(s3_server, ray_local):
    """Two subjects and a corrupt one fine-tuned by two actors into a fresh bucket."""
    from dreamblend_ray.finetune_job import run_finetune_job

    root = f"s3://{s3_server.new_bucket('jobs')}"
    upload_subject_images(root)
    manifest = write_jsonl(storage.join(root, "subjects.jsonl"), [
        {"subject_id": "red", "class_noun": "box", "images": ["images/red/0.png", "images/red/1.png"]},
        {"subject_id": "blue", "class_noun": "box", "images": "images/blue",
         "finetune": {"checkpoint_steps": [1, 4]}},
        {"subject_id": "broken", "class_noun": "box", "images": ["images/broken/0.png"]},
    ])
    output = storage.join(root, "out")
    result = run_finetune_job(manifest, output, base="tiny", config=TINY_FINETUNE, resources=TWO_ACTORS,
                              run_id="first")
    return {"root": root, "manifest": manifest, "output": output, "result": result}


@pytest.mark.slow
def test_subjects_finetune_in_parallel_into_s3_and_a_corrupt_one_fails_alone(finetuned):
    output, result = finetuned["output"], finetuned["result"]
    rows = {row["subject_id"]: row for row in read_parquet(storage.join(output, "runs/first/results.parquet"))}
    assert rows == {row["subject_id"]: row for row in result.rows}
    assert {k: r["status"] for k, r in rows.items()} == {"red": "succeeded", "blue": "succeeded", "broken": "failed"}
    assert "images/broken/0.png" in rows["broken"]["error"] and "not a readable image" in rows["broken"]["error"]
    assert rows["blue"]["saved_steps"] == [1, 4] and rows["red"]["saved_steps"] == [2, 4]
    for subject in ("red", "blue"):
        row = rows[subject]
        assert row["steps"] == 4 and np.isfinite(row["final_loss"]) and row["seconds"] > 0
        assert checkpoints.is_complete(output, subject)
        for uri in row["checkpoint_uris"]:
            assert storage.exists(storage.join(uri, checkpoints.LORA_WEIGHT_NAME))
    assert not checkpoints.is_complete(output, "broken")
    assert storage.read_json(storage.join(output, "runs/first/job.json"))["subjects"] == 3


def test_rerun_skips_finished_subjects_without_starting_actors(finetuned, monkeypatch):
    from dreamblend_ray import finetune_job

    output = finetuned["output"]
    before = storage.read_bytes(checkpoints.weight_uri(output, "red", 4, "lora"))
    specs = [s for s in read_subjects(finetuned["manifest"]) if s.subject_id != "broken"]
    monkeypatch.setattr(finetune_job, "fine_tune_all", lambda *a, **k: pytest.fail("started actors"))
    result = finetune_job.run_finetune_job(specs, output, base="tiny", config=TINY_FINETUNE,
                                           resources=TWO_ACTORS, run_id="second")
    assert {row["subject_id"]: row["status"] for row in result.rows} == {"red": "skipped", "blue": "skipped"}
    assert {r["subject_id"]: r["saved_steps"] for r in result.rows} == {"red": [2, 4], "blue": [1, 4]}
    assert storage.read_bytes(checkpoints.weight_uri(output, "red", 4, "lora")) == before
    assert len(read_parquet(storage.join(output, "runs/second/results.parquet"))) == 2


def test_actor_skips_a_subject_finished_meanwhile(finetuned):
    from dreamblend_ray.finetune_job import FinetuneActor

    actor = FinetuneActor(base="tiny", output=finetuned["output"], torch_threads=1, use_gpu=False)
    row = actor.run_one({"subject_id": "red", "class_noun": "box", "images": ["unused.png"], "config": "{}"})
    assert row["status"] == "skipped" and row["saved_steps"] == [2, 4]


@pytest.mark.slow
def test_job_survives_an_endpoint_that_refuses_connections_for_a_moment(s3_server, ray_local, finetuned):
    from dreamblend_ray.finetune_job import run_finetune_job

    output = f"s3://{s3_server.new_bucket('outage')}/out"
    spec = SubjectSpec("red", "box", (storage.join(finetuned["root"], "images/red/0.png"),))
    # The first request from an actor for the subject's keys cuts the connection and closes the port for 3 s.
    s3_server.proxy.outage_after(b"/out/subjects/red/", 3.0)
    outages = s3_server.proxy.outages
    result = run_finetune_job([spec], output, base="tiny", config=TINY_FINETUNE,
                              resources=JobResources(num_actors=1, torch_threads=1), run_id="outage")
    assert s3_server.proxy.outages == outages + 1
    (row,) = result.rows
    assert row["status"] == "succeeded", row["error"]
    assert checkpoints.is_complete(output, "red")


@pytest.mark.slow
def test_generation_writes_images_and_index(finetuned, ray_local):
    from dreamblend_ray.generate_job import run_generate_job

    root, output = finetuned["root"], finetuned["output"]
    requests = write_jsonl(storage.join(root, "requests.jsonl"), [
        {"subject_id": "red", "prompt": "a photo of sks box", "seed": 7, "num_images": 2},
        {"subject_id": "blue", "prompt": "a photo of sks box on grass", "settings": {"alpha": 0.0}},
        {"subject_id": "red", "prompt": "a photo of sks box at night", "seed": 1, "edit_step": 2},
        {"subject_id": "broken", "prompt": "a photo of sks box"},
    ])
    gen_out = storage.join(root, "generated")
    result = run_generate_job(requests, gen_out, checkpoints_root=output, base="tiny",
                              settings={"num_inference_steps": 3, "guidance_scale": 2.0}, batch_size=4,
                              resources=TWO_ACTORS, run_id="gen")
    index = read_parquet(storage.join(gen_out, "runs/gen/index.parquet"))
    assert index == result.rows
    assert [(r["row"], r["k"], r["seed"], r["status"]) for r in index] == [
        (0, 0, 7, "succeeded"), (0, 1, 8, "succeeded"), (1, 0, 0, "succeeded"), (2, 0, 1, "succeeded"),
        (3, 0, 0, "failed")]
    assert "subjects/broken/subject.json" in index[4]["error"] and index[4]["image_uri"] is None
    assert (index[0]["guidance_step"], index[0]["edit_step"]) == (2, 4)
    assert (index[3]["guidance_step"], index[3]["edit_step"]) == (2, 2)
    for row in index[:4]:
        assert row["image_uri"] == storage.join(gen_out, "images", row["subject_id"], f"{row['row']}-{row['k']}.png")
        image = Image.open(io.BytesIO(storage.read_bytes(row["image_uri"])))
        assert image.format == "PNG" and image.size == (32, 32) and row["seconds"] > 0
    assert storage.list_files(storage.join(gen_out, "images")) == ["blue/1-0.png", "red/0-0.png", "red/0-1.png",
                                                                   "red/2-0.png"]
