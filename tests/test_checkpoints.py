"""Subject layout, manifest validation, and loading/unloading a checkpoint pair."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreamblend_ray.training import checkpoints, layout

from dreamblend_ray.io import storage
from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.training.finetune import finetune_subject
from dreamblend_ray.method.pair import AdapterPair, TwoUNetPair


# One thread: tiny training steps gain nothing from two, and CPU results stay bitwise reproducible.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, components):
    """One LoRA subject and one full fine-tune, 6 steps, checkpoints at 2, 4, 6."""
    root = str(tmp_path_factory.mktemp("subjects"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    common = dict(steps=6, checkpoint_steps=(2, 4, 6), prior_preservation=False)
    finetune_subject(components, images, "dog", "rex", root,
                     FinetuneConfig(learning_rate=5e-2, **common), progress=False)
    finetune_subject(components, images, "dog", "fido", root,
                     FinetuneConfig(method="full", learning_rate=1e-3, **common), progress=False)
    return root


def probe(unet):
    gen = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 32, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([400]), embeds).sample


def test_layout():
    assert layout.subject_uri("s3://b/p", "rex") == "s3://b/p/subjects/rex"
    assert layout.checkpoint_uri("s3://b/p/", "rex", 40) == "s3://b/p/subjects/rex/checkpoints/step-40"
    assert layout.manifest_uri("/data", "rex") == "/data/subjects/rex/subject.json"
    assert layout.weight_uri("/d", "rex", 5, "lora").endswith("step-5/pytorch_lora_weights.safetensors")
    assert layout.weight_uri("/d", "rex", 5, "full").endswith("step-5/unet.safetensors")
    with pytest.raises(ValueError, match="subject_id"):
        layout.subject_uri("/d", "../etc")


def test_manifest_round_trip(trained):
    manifest = layout.read_manifest(trained, "rex")
    assert manifest["version"] == 1 and manifest["steps"] == [2, 4, 6]
    assert (manifest["guidance_step"], manifest["edit_step"]) == (2, 6)
    assert manifest["base"]["source"] == "tiny" and len(manifest["base"]["config_sha256"]) == 64
    assert manifest["config"]["checkpoint_steps"] == [2, 4, 6]
    assert layout.is_complete(trained, "rex")
    assert not layout.is_complete(trained, "nobody")
    with pytest.raises(FileNotFoundError):
        layout.read_manifest(trained, "nobody")


def test_finetuned_with_compares_the_recorded_settings(trained):
    same = FinetuneConfig(learning_rate=5e-2, steps=6, checkpoint_steps=(2, 4, 6), prior_preservation=False)
    assert layout.finetuned_with(trained, "rex", same)
    assert not layout.finetuned_with(trained, "rex", FinetuneConfig(**{**same.__dict__, "learning_rate": 1e-2}))
    assert not layout.finetuned_with(trained, "nobody", same)


@pytest.mark.parametrize("field, value", [
    ("version", 2), ("version", "1"), ("subject_id", "a b"), ("kind", "dora"), ("steps", []),
    ("steps", [4, 2]), ("steps", "2,4"), ("guidance_step", 3), ("edit_step", None),
    ("base", {"source": "tiny", "config_sha256": "abc"}), ("loss_curve", ["x"]), ("config", []),
    ("instance_prompt", ""), ("class_noun", None),
])
def test_malformed_manifest_names_the_field(trained, field, value):
    manifest = copy.deepcopy(layout.read_manifest(trained, "rex"))
    manifest[field] = value
    with pytest.raises(ValueError, match=field):
        layout.validate_manifest(manifest)


def test_missing_field_and_bad_json(trained, tmp_path):
    manifest = copy.deepcopy(layout.read_manifest(trained, "rex"))
    del manifest["timings"]
    with pytest.raises(ValueError, match="timings"):
        layout.validate_manifest(manifest)
    storage.write_text(layout.manifest_uri(str(tmp_path), "rex"), "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        layout.read_manifest(str(tmp_path), "rex")


def test_lora_checkpoint_is_diffusers_format(trained):
    tensors, metadata = checkpoints.decode_safetensors(
        storage.read_bytes(layout.weight_uri(trained, "rex", 6, "lora")))
    assert tensors and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in tensors)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]


def test_load_pair_lora(trained, components):
    base = probe(components.unet)
    pair, manifest = checkpoints.load_pair(trained, "rex", components)
    try:
        assert isinstance(pair, AdapterPair) and pair.unet is components.unet
        assert (pair.guidance_adapter, pair.edit_adapter) == ("rex--g2", "rex--e6")
        assert pair.meta["instance_prompt"] == manifest["instance_prompt"] == "a photo of sks dog"
        assert not any(p.requires_grad for p in components.unet.parameters())
        with pair.guidance() as unet:
            g = probe(unet)
        with pair.edit() as unet:
            e = probe(unet)
        assert not torch.equal(g, e) and not torch.equal(e, base)
        again, _ = checkpoints.load_pair(trained, "rex", components)  # reuses the loaded adapters
        with again.edit() as unet:
            torch.testing.assert_close(probe(unet), e, rtol=0, atol=0)
    finally:
        checkpoints.unload_pair(pair, components)
    assert not getattr(components.unet, "peft_config", None)
    torch.testing.assert_close(probe(components.unet), base, rtol=0, atol=0)


def test_load_pair_step_overrides(trained, components):
    pair, _ = checkpoints.load_pair(trained, "rex", components, guidance_step=4, edit_step=4)
    try:
        assert pair.identical and pair.guidance_adapter == "rex--g4"
    finally:
        checkpoints.unload_pair(pair, components)
    with pytest.raises(ValueError, match="edit_step 5"):
        checkpoints.load_pair(trained, "rex", components, edit_step=5)
    assert not getattr(components.unet, "peft_config", None)


def test_load_pair_full(trained, components):
    pair, manifest = checkpoints.load_pair(trained, "fido", components)
    assert isinstance(pair, TwoUNetPair) and manifest["kind"] == "full"
    assert pair.guidance_unet is not components.unet and not pair.identical
    assert not torch.equal(probe(pair.guidance_unet), probe(pair.edit_unet))
    same, _ = checkpoints.load_pair(trained, "fido", components, guidance_step=6)
    assert same.identical
    torch.testing.assert_close(probe(same.edit_unet), probe(pair.edit_unet), rtol=0, atol=0)
    checkpoints.unload_pair(pair, components)


def test_load_pair_refuses_another_base(trained, components, tmp_path):
    storage.copy_dir(layout.subject_uri(trained, "rex"), layout.subject_uri(str(tmp_path), "rex"))
    manifest = layout.read_manifest(str(tmp_path), "rex")
    manifest["base"]["config_sha256"] = "0" * 64
    layout.write_manifest(str(tmp_path), "rex", manifest)
    with pytest.raises(ValueError, match="fine-tuned from base"):
        checkpoints.load_pair(str(tmp_path), "rex", components)
