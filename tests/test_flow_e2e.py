"""Issue 31: everything above the model works unchanged on the flow-matching bases tiny-flux and tiny-sd3.

As tests/test_families_e2e.py does for SDXL: a subject fine-tuned with the training API is
generated from through the code the Serve replica runs (``build_job`` -> ``LoadedPair`` ->
``_sample``) and
through ``dreamblend generate`` and ``dreamblend attention``; every --base validator accepts them.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.cli import main
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.jobs.common import check_base
from dreamblend_ray.method.flow_rows import FlowRowEngine, row_engine
from dreamblend_ray.method.rows import RowEngine
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models.components import BUILTIN_BASES, load_components, resolve_base
from dreamblend_ray.serving.app import DreamBlendModel, LoadedPair
from dreamblend_ray.serving.requests import AppArgs, GenerateRequest, build_job
from dreamblend_ray.training.finetune import finetune_subject

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 4
KINDS = ["tiny-flux", "tiny-sd3"]
CONFIG = dict(steps=2, checkpoint_steps=(1, 2), prior_preservation=False, learning_rate=1e-3)


def photos(count: int = 2, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A LoRA subject "rex" per family, each in its own storage root."""
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        manifest = finetune_subject(kind, photos(), "dog", "rex", str(root), FinetuneConfig(**CONFIG), progress=False)
        assert manifest["base"]["family"] == kind.removeprefix("tiny-") and manifest["kind"] == "lora"
        out[kind] = root
    return out


def replica(base: str, root):
    """The Serve replica class with its base loaded as ``__init__`` loads it (no Serve context)."""
    args = AppArgs(base=base, storage_root=str(root), default_steps=STEPS)
    return DreamBlendModel.func_or_class.local(args, load_components(args.base, device="cpu"))


@pytest.mark.parametrize("base", KINDS)
def test_every_base_validator_accepts_the_flow_families(base):
    assert base in BUILTIN_BASES and resolve_base(base) == base
    assert check_base(base) == base
    assert AppArgs(base=base).base == base


@pytest.mark.parametrize("kind", KINDS)
def test_a_subject_is_served_at_the_familys_size(kind, roots):
    model = replica(kind, roots[kind])
    with pytest.raises(ValueError, match="FlowRowEngine"):
        RowEngine(model.components)  # the replica builds the family's engine with row_engine
    assert isinstance(row_engine(model.components), FlowRowEngine)
    request = GenerateRequest(subject_id="rex", prompt="a photo of sks dog on the beach", num_images=2, seed=3)
    job = build_job(request, model.args, seed=request.seed)
    output = model._sample(LoadedPair(job.model_id, model), [job], None)[0]
    images = [Image.open(io.BytesIO(png)) for png in output.pngs]
    size = model.components.default_size
    assert [im.size for im in images] == [(size, size)] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_dreamblend_generate_and_attention_on_a_flow_subject(kind, roots, tmp_path):
    out = tmp_path / "out"
    rc = main(["--log-level", "WARNING", "generate", "--base", kind, "--steps", str(STEPS), "--checkpoints",
               str(roots[kind]), "--subject-id", "rex", "--prompt", "a photo of sks dog", "--seed", "3",
               "--out", str(out)])
    assert rc == 0
    sidecar = json.loads((out / "settings.json").read_text())
    assert sidecar["base"]["family"] == kind.removeprefix("tiny-")
    assert Image.open(out / sidecar["images"][0]["image"]).size == (32, 32)
    maps = tmp_path / "maps"
    rc = main(["--log-level", "WARNING", "attention", "--base", kind, "--steps", str(STEPS), "--checkpoints",
               str(roots[kind]), "--subject-id", "rex", "--prompt", "a photo of sks dog", "--seed", "3",
               "--out", str(maps)])
    assert rc == 0
    assert any(maps.iterdir())


@pytest.mark.parametrize("kind", KINDS)
def test_the_collapse_probe_reads_t5_words(kind, roots):
    from dreamblend_ray.evaluation.collapse import probe_model
    from dreamblend_ray.method.pair import single

    components = load_components(kind)
    result = probe_model(DreamBlendSampler(components), single(components.transformer),
                         ["a sks dog in the jungle"], [0], "sks", "dog", steps=2)
    (entry,) = result["per_prompt"]
    assert set(entry["words"]) == {"jungle"} and 0 <= entry["collapse"] <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_the_replicas_continuous_batch_serves_flow_rows_as_they_are_served_alone(kind, roots):
    import asyncio

    from dreamblend_ray.config import SamplingConfig
    from dreamblend_ray.serving.batching import GenerationJob

    model = replica(kind, roots[kind])
    model.continuous = model._continuous_batch()
    assert isinstance(model.continuous.engine, FlowRowEngine)
    jobs = [GenerationJob("rex", ["a sks dog on the beach"], [1], SamplingConfig(num_inference_steps=4, alpha=0.5)),
            GenerationJob("rex", ["a sks dog in snow"], [2], SamplingConfig(num_inference_steps=3, alpha=0.0))]
    handle = LoadedPair("rex", model)

    async def scenario():
        pair = await asyncio.to_thread(handle.pin)
        adapters = (pair.guidance_adapter, pair.edit_adapter)

        async def submit(job, steps):
            while model.continuous.steps < steps:
                await asyncio.sleep(0.005)
            return await model.continuous.submit(job, adapters)
        return await asyncio.gather(submit(jobs[0], 0), submit(jobs[1], 1))

    results = asyncio.run(scenario())
    for job, (output, _, _) in zip(jobs, results):
        served = np.asarray(Image.open(io.BytesIO(output.pngs[0])).convert("RGB")).astype(int)
        static = model._sample(LoadedPair(job.model_id, model), [job], None)[0].pngs[0]
        assert np.abs(served - np.asarray(Image.open(io.BytesIO(static)).convert("RGB")).astype(int)).max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_choose_pair_by_attention_on_a_flow_subject(kind, roots):
    from dreamblend_ray.evaluation.collapse import choose_pair_by_attention, probe_checkpoints

    components = load_components(kind)
    probe = probe_checkpoints(str(roots[kind]), "rex", components, ["a sks dog in the jungle"], [0], steps=2)
    assert [row["step"] for row in probe["rows"]] == [1, 2]
    assert not getattr(components.transformer, "peft_config", None)  # the probe unloads what it loaded
    choice = choose_pair_by_attention(probe["rows"], probe["base"], default=(1, 2))
    assert choice["edit_step"] == 2 and choice["guidance_step"] in (1, 2)
