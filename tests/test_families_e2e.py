"""Issue 18: everything above the model works unchanged on an SDXL base (and SD 2.x).

A subject is fine-tuned on the tiny SDXL model with the training API into a storage root, then
generated from through the code the Serve replica runs (request -> ``build_job`` -> the replica's
``LoadedPair`` and ``_sample``, i.e. ``checkpoints.load_pair`` + ``batching.run_group``) and through
``dreamblend generate``; images come out at the family's default size. Every place that validates
``--base`` accepts the built-in tiny-sd2 and tiny-sdxl, and a subject fine-tuned on one family is
refused on another with a clear ValueError.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.cli import main
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.jobs.common import check_base
from dreamblend_ray.models.components import BUILTIN_BASES, load_components, resolve_base
from dreamblend_ray.serving.app import DreamBlendModel, LoadedPair
from dreamblend_ray.serving.requests import AppArgs, GenerateRequest, build_job
from dreamblend_ray.training import checkpoints
from dreamblend_ray.training.finetune import finetune_subject

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 4  # sampling steps
CONFIG = dict(steps=2, checkpoint_steps=(1, 2), prior_preservation=False, learning_rate=1e-3)


def photos(count: int = 2, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def finetune(base: str, root, subject: str) -> dict:
    return finetune_subject(base, photos(), "dog", subject, str(root), FinetuneConfig(**CONFIG), progress=False)


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory):
    """A LoRA subject "rex" fine-tuned on tiny-sdxl."""
    root = tmp_path_factory.mktemp("sdxl-subjects")
    manifest = finetune("tiny-sdxl", root, "rex")
    assert manifest["base"]["family"] == "sdxl" and manifest["kind"] == "lora"
    return root


def replica(base: str, root) -> DreamBlendModel.func_or_class:
    """The Serve replica class with its base loaded as ``__init__`` loads it (no Serve context)."""
    args = AppArgs(base=base, storage_root=str(root), default_steps=STEPS)
    return DreamBlendModel.func_or_class.local(args, load_components(args.base, device="cpu"))


def serve_images(model, request: GenerateRequest) -> list[Image.Image]:
    job = build_job(request, model.args, seed=request.seed)
    handle = LoadedPair(job.model_id, model)
    output = model._sample(handle, [job], None)[0]
    return [Image.open(io.BytesIO(png)) for png in output.pngs]


@pytest.mark.parametrize("base", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_every_base_validator_accepts_the_builtin_families(base):
    assert base in BUILTIN_BASES
    assert resolve_base(base) == base
    assert check_base(base) == base  # the jobs' driver-side check
    assert AppArgs(base=base).base == base  # the Serve application's args


def test_a_subject_finetuned_on_sdxl_is_served_at_the_familys_size(sdxl_root):
    model = replica("tiny-sdxl", sdxl_root)
    assert model.components.family == "sdxl"
    request = GenerateRequest(subject_id="rex", prompt="a photo of sks dog on the beach", num_images=2, seed=3)
    images = serve_images(model, request)
    size = model.components.default_size
    assert [im.size for im in images] == [(size, size)] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds 3 and 4
    # the same request again (pair already loaded, reused) gives the same pixels
    again = serve_images(model, request)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))


def test_dreamblend_generate_on_an_sdxl_subject(sdxl_root, tmp_path):
    out = tmp_path / "out"
    rc = main(["--log-level", "WARNING", "generate", "--base", "tiny-sdxl", "--steps", str(STEPS),
               "--checkpoints", str(sdxl_root), "--subject-id", "rex", "--prompt", "a photo of sks dog",
               "--seed", "3", "--out", str(out)])
    assert rc == 0
    sidecar = json.loads((out / "settings.json").read_text())
    assert sidecar["base"]["family"] == "sdxl"
    size = load_components("tiny-sdxl").default_size
    assert Image.open(out / sidecar["images"][0]["image"]).size == (size, size)


def test_a_subject_finetuned_on_sd_is_refused_on_sdxl(tmp_path):
    finetune("tiny", tmp_path, "rex")
    components = load_components("tiny-sdxl")
    with pytest.raises(ValueError, match=r"fine-tuned from base 'tiny' of model family 'sd', but the loaded base "
                                         r"'tiny-sdxl' is of family 'sdxl'"):
        checkpoints.load_pair(str(tmp_path), "rex", components)
    assert not getattr(components.unet, "peft_config", None)  # nothing was loaded onto the SDXL UNet
