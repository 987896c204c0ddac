"""`dreamblend generate` and `attention` default --base to the base the subject's subject.json records
(commands.subject_base); an explicit --base wins; a base that cannot be loaded asks for --base."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.cli import main
from dreamblend_ray.commands import attention, generate
from dreamblend_ray.commands.subject_base import base_from_manifest, resolve_base_arg
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.jobs.flags import DEFAULT_BASE
from dreamblend_ray.training import layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_subject(root, subject_id: str, source: str, family: str = "sd") -> None:
    """A minimal valid subject.json recording the base ``source`` (no checkpoints)."""
    manifest = {
        "version": layout.MANIFEST_VERSION, "subject_id": subject_id, "class_noun": "dog", "token": "sks",
        "instance_prompt": "a photo of sks dog", "base": {"source": source, "family": family,
                                                          "config_sha256": "0" * 64},
        "kind": "lora", "steps": [2, 4], "guidance_step": 2, "edit_step": 4, "loss_curve": [0.5],
        "config": {}, "timings": {}, "library_versions": {},
    }
    layout.write_manifest(str(root), subject_id, manifest)


def args_of(**given) -> argparse.Namespace:
    values = {"base": None, "checkpoints": None, "subject_id": None, "guidance_ckpt": None, "edit_ckpt": None}
    return argparse.Namespace(**{**values, **given})


@pytest.mark.parametrize("source", ["tiny-sdxl", "tiny", "tiny-sd2", "embedded", "s3://bucket/models/sd15"])
def test_recorded_builtin_or_uri_is_used_as_is(tmp_path, source):
    write_subject(tmp_path, "rex", source)
    assert resolve_base_arg(args_of(checkpoints=str(tmp_path), subject_id="rex")) == source


def test_recorded_local_folder_is_used_while_it_exists(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    write_subject(tmp_path / "store", "rex", str(base))
    assert resolve_base_arg(args_of(checkpoints=str(tmp_path / "store"), subject_id="rex")) == str(base)

    (base / "model_index.json").unlink()
    with pytest.raises(ValueError, match="holds no model_index.json; pass --base"):
        resolve_base_arg(args_of(checkpoints=str(tmp_path / "store"), subject_id="rex"))
    base.rmdir()
    with pytest.raises(ValueError, match=r"'rex' was fine-tuned on base .*my-base.*no folder .* pass --base"):
        resolve_base_arg(args_of(checkpoints=str(tmp_path / "store"), subject_id="rex"))


def test_an_in_memory_base_cannot_be_reloaded():
    with pytest.raises(ValueError, match="pass --base"):
        base_from_manifest({"subject_id": "rex", "base": {"source": "in-memory"}})


def test_explicit_base_wins_and_uri_pairs_keep_the_default(tmp_path):
    write_subject(tmp_path, "rex", "tiny-sdxl")
    assert resolve_base_arg(args_of(base="tiny", checkpoints=str(tmp_path), subject_id="rex")) == "tiny"
    assert resolve_base_arg(args_of(base="tiny", checkpoints=str(tmp_path), subject_id="nobody")) == "tiny"
    assert resolve_base_arg(args_of(guidance_ckpt="g", edit_ckpt="e")) == DEFAULT_BASE
    with pytest.raises(FileNotFoundError):
        resolve_base_arg(args_of(checkpoints=str(tmp_path), subject_id="nobody"))


@pytest.mark.parametrize("command", [generate, attention])
def test_parsers_default_to_none_and_say_so(command):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    (base,) = [a for a in parser._actions if "--base" in a.option_strings]
    assert base.default is None and "subject.json" in base.help


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory):
    """A LoRA subject "rex" fine-tuned 2 steps on tiny-sdxl."""
    from dreamblend_ray.training.finetune import finetune_subject

    root = tmp_path_factory.mktemp("sdxl")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    config = FinetuneConfig(steps=2, checkpoint_steps=(1, 2), num_class_images=0, prior_preservation=False)
    finetune_subject("tiny-sdxl", images, "dog", "rex", str(root), config, progress=False)
    return str(root)


@pytest.mark.parametrize("command", ["generate", "attention"])
def test_cli_samples_a_tiny_sdxl_subject_without_base(sdxl_root, tmp_path, command):
    out = tmp_path / "out"
    rc = main(["--log-level", "WARNING", command, "--checkpoints", sdxl_root, "--subject-id", "rex",
               "--prompt", "a photo of sks dog", "--steps", "2", "--out", str(out)])
    assert rc == 0
    sidecar = json.loads((out / "settings.json").read_text())
    assert sidecar["base"]["source"] == "tiny-sdxl" and sidecar["base"]["family"] == "sdxl"
    if command == "generate":  # an explicit --base still wins: here the wrong family, refused
        assert main([command, "--base", "tiny", "--checkpoints", sdxl_root, "--subject-id", "rex",
                     "--prompt", "a dog", "--steps", "2", "--out", str(tmp_path / "other")]) == 2


def test_cli_asks_for_base_when_the_recorded_folder_is_gone(tmp_path, caplog):
    write_subject(tmp_path / "store", "rex", str(tmp_path / "deleted-base"))
    rc = main(["generate", "--checkpoints", str(tmp_path / "store"), "--subject-id", "rex",
               "--prompt", "a dog", "--out", str(tmp_path / "out")])
    assert rc == 2 and "pass --base" in caplog.text and not (tmp_path / "out").exists()
