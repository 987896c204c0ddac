import json

import pytest
import torch

from dreamblend_ray.models.components import (
    build_tiny_components, load_components, model_identity, resolve_base, select_dtype,
)


def _unet_output(components, prompt="a photo of sks dog", seed=0):
    ids = components.tokenizer(prompt, padding="max_length", truncation=True,
                               max_length=components.tokenizer.model_max_length,
                               return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        embeddings = components.text_encoder(ids)[0]
        return components.unet(latents, 500, embeddings).sample


def test_tiny_model_is_deterministic():
    a, b = build_tiny_components(seed=0), build_tiny_components(seed=0)
    assert torch.equal(_unet_output(a), _unet_output(b))
    for (name, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), name


def test_tiny_model_depends_on_seed():
    assert not torch.equal(_unet_output(build_tiny_components(0)), _unet_output(build_tiny_components(1)))


def test_tiny_model_shapes(tiny_components):
    assert tiny_components.vae_scale_factor == 2
    assert tiny_components.default_size == 32
    names = [n for n in tiny_components.unet.attn_processors if "attn2" in n]
    assert any(n.startswith("down_blocks.0") for n in names)  # 16x16
    assert any(n.startswith("mid_block") for n in names)      # 8x8


def test_build_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_components(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_save_load_round_trip(tiny_components, tiny_model_dir):
    loaded = load_components(str(tiny_model_dir))
    assert torch.equal(_unet_output(tiny_components), _unet_output(loaded))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiny_components.vae.encode(image).latent_dist.mean,
                           loaded.vae.encode(image).latent_dist.mean)
    prompt = "a red dog wearing a hat"
    assert tiny_components.tokenizer(prompt).input_ids == loaded.tokenizer(prompt).input_ids
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    assert model_identity(loaded)["config_sha256"] == model_identity(tiny_components)["config_sha256"]
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert list(tiny_model_dir.glob("unet/*.safetensors"))


def test_saved_layout_loads_in_diffusers_pipeline(tiny_components, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert torch.equal(_unet_output(tiny_components), _unet_output(pipe))


def test_commands_print_no_library_warnings(tmp_path):
    """Loading a base and fine-tuning (class images included) import no torchvision-only processors."""
    import subprocess
    import sys

    code = ("from dreamblend_ray.models.components import load_components; "
            "from dreamblend_ray.training.finetune import generate_class_images; "
            "from dreamblend_ray.config import FinetuneConfig; "
            "c = load_components('tiny'); "
            "generate_class_images(c, 'a dog', [0], 32, FinetuneConfig(class_sampling_steps=2))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr + done.stdout


def test_tokenizer_keeps_words_whole(tiny_components):
    tok = tiny_components.tokenizer
    ids = tok("a photo of sks dog").input_ids
    assert len(ids) == 5 + 2  # one token per word plus start and end
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_bad_base_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        resolve_base(str(tmp_path))
    with pytest.raises(ValueError, match="is not one of \['tiny'"):
        load_components("no/such/dir")


def test_incomplete_directory_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match="lacks components"):
        load_components(str(tmp_path))


def test_dtype_selection():
    assert select_dtype(torch.device("cpu")) == torch.float32
    assert select_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert select_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    assert select_dtype(torch.device("cpu"), "Float16") == torch.float16
    for bad in ("fp8", "float64", "", "half"):
        with pytest.raises(ValueError, match="dtype must be one of fp32, fp16, bf16"):
            select_dtype(torch.device("cpu"), bad)


def _dtype_flags() -> dict[str, "argparse.Action"]:
    """Every --dtype and --mixed-precision flag of every command and job script, by where it is."""
    import argparse

    from dreamblend_ray import cli

    from dreamblend_ray.jobs import cli as job_cli
    from dreamblend_ray.commands import evaluate

    parsers = {f"dreamblend {name}": sub for action in cli.build_parser()._actions
               if isinstance(action, argparse._SubParsersAction) for name, sub in action.choices.items()}
    parsers["jobs/finetune_subjects.py"] = job_cli.finetune_parser()
    parsers["jobs/generate_batch.py"] = job_cli.generate_parser()
    parsers["jobs/evaluate.py"] = argparse.ArgumentParser()
    evaluate.add_arguments(parsers["jobs/evaluate.py"])
    return {f"{where} {flag}": action for where, parser in parsers.items() for action in parser._actions
            for flag in action.option_strings if flag in ("--dtype", "--mixed-precision")}


def test_every_dtype_flag_takes_the_same_names():
    """Issue 16.10: `evaluate --dtype` advertised float32/float16/bfloat16 but took only fp32/fp16/bf16."""
    import argparse

    from dreamblend_ray.dtypes import ACCEPTED, ALIASES, DTYPES

    flags = _dtype_flags()
    dtype_flags = {k: a for k, a in flags.items() if k.endswith("--dtype")}
    assert {"dreamblend generate --dtype", "dreamblend evaluate --dtype", "dreamblend serve --dtype",
            "jobs/generate_batch.py --dtype", "jobs/evaluate.py --dtype"} <= set(dtype_flags)
    for where, action in dtype_flags.items():
        assert action.choices is None and action.default is None, where
        assert [action.type(name) for name in ACCEPTED] == list(DTYPES) + [ALIASES[a] for a in ALIASES], where
        assert all(name in action.help for name in ACCEPTED), where
        for bad in ("fp8", "float64", "auto"):
            with pytest.raises(argparse.ArgumentTypeError, match="dtype must be one of"):
                action.type(bad)
    mixed = {k: a for k, a in flags.items() if k.endswith("--mixed-precision")}
    assert {"dreamblend finetune --mixed-precision", "jobs/finetune_subjects.py --mixed-precision"} <= set(mixed)
    for where, action in mixed.items():
        assert [action.type(v) for v in ("auto", "no", "fp16", "float16", "bf16", "bfloat16", "fp32", "float32")] == [
            "auto", "no", "fp16", "fp16", "bf16", "bf16", "no", "no"], where


def test_dtype_names_reach_the_configs_and_serve_args(tmp_path):
    from pydantic import ValidationError

    from dreamblend_ray.cli import build_parser
    from dreamblend_ray.commands.serve import app_args
    from dreamblend_ray.config import FinetuneConfig
    from dreamblend_ray.serving.requests import AppArgs

    args = build_parser().parse_args(["generate", "--prompt", "p", "--out", str(tmp_path), "--dtype", "bfloat16"])
    assert args.dtype == "bf16"
    assert app_args(build_parser().parse_args(["serve", "--dtype", "float16"])).dtype == "fp16"
    assert AppArgs(dtype="float32").dtype == "fp32" and AppArgs().dtype is None
    with pytest.raises(ValidationError, match="dtype must be one of"):
        AppArgs(dtype="fp64")
    assert FinetuneConfig(mixed_precision="bfloat16").mixed_precision == "bf16"
    assert FinetuneConfig(mixed_precision="fp32").mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        FinetuneConfig(mixed_precision="fp64")


@pytest.mark.parametrize("order", [0, 1, 2])
def test_every_word_is_one_token_whatever_the_order(order):
    import random

    from dreamblend_ray.models.tokenizers import build_tokenizer

    words = ["triangle", "striped", "star", "stripe", "a", "tr", "sks", "background", "ground"]
    random.Random(order).shuffle(words)
    tok = build_tokenizer(words, max_length=16)
    for word in words:
        assert tok.convert_ids_to_tokens(tok(word).input_ids)[1:-1] == [f"{word}</w>"], word
    assert len(tok("zebra").input_ids) > 3  # unknown words still tokenize, by pieces
