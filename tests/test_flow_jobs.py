"""The Ray Data jobs on the flow-matching bases (issue 31): the fine-tune job trains a tiny-flux
subject into a storage root and the generate job makes its images, as they do on the UNet bases."""

import io

import pytest
from PIL import Image

from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.io import storage
from dreamblend_ray.jobs.common import JobResources, read_parquet
from dreamblend_ray.training import layout
from test_jobs import png, write_jsonl


@pytest.mark.slow
def test_finetune_and_generate_jobs_on_tiny_flux(tmp_path, ray_local):
    from dreamblend_ray.jobs.finetune import run_finetune_job
    from dreamblend_ray.jobs.generate import run_generate_job

    root = str(tmp_path)
    for i in range(2):
        storage.write_bytes(storage.join(root, "images", "red", f"{i}.png"), png((255, 0, 0)))
    manifest = write_jsonl(storage.join(root, "subjects.jsonl"),
                           [{"subject_id": "red", "class_noun": "box", "images": "images/red"}])
    output = storage.join(root, "out")
    config = FinetuneConfig(steps=2, checkpoint_steps=(1, 2), prior_preservation=False, rank=2, seed=0)
    one = JobResources(num_actors=1, cpus_per_actor=1, torch_threads=1)
    result = run_finetune_job(manifest, output, base="tiny-flux", config=config, resources=one, run_id="flux")
    (row,) = result.rows
    assert row["status"] == "succeeded" and layout.read_manifest(output, "red")["base"]["family"] == "flux"
    requests = write_jsonl(storage.join(root, "requests.jsonl"),
                           [{"subject_id": "red", "prompt": "a photo of sks box", "seed": 7, "num_images": 2}])
    generated = storage.join(root, "generated")
    run_generate_job(requests, generated, checkpoints_root=output, base="tiny-flux",
                     settings={"num_inference_steps": 3}, batch_size=2, resources=one, run_id="gen")
    index = read_parquet(storage.join(generated, "runs/gen/index.parquet"))
    assert [r["status"] for r in index] == ["succeeded", "succeeded"]
    assert Image.open(io.BytesIO(storage.read_bytes(index[0]["image_uri"]))).size == (32, 32)
