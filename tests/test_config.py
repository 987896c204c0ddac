import dataclasses

import pytest

from dreamblend_ray.config import LayerSelection, SamplingConfig, to_dict, validate_subject_id


def test_defaults_are_valid_and_frozen():
    config = SamplingConfig()
    assert config.window == 9  # round(0.3 * 30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 1.0


@pytest.mark.parametrize("field,value,message", [
    ("num_inference_steps", 0, r"num_inference_steps must be in \[1, 1000\]"),
    ("num_inference_steps", 2.5, "num_inference_steps must be an integer"),
    ("alpha", -0.1, r"alpha must be in \[0.0, 10.0\]"),
    ("alpha", float("nan"), "alpha must be finite"),
    ("guidance_scale", "high", "guidance_scale must be a number"),
    ("guidance_fraction", 1.5, r"guidance_fraction must be in \[0.0, 1.0\]"),
    ("eta_schedule", "exp", "eta_schedule must be one of"),
    ("height", 4, r"height must be in \[8, 4096\]"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{field: value})


def test_guidance_steps_bounded_by_steps():
    assert SamplingConfig(num_inference_steps=10, guidance_steps=10).window == 10
    assert SamplingConfig(num_inference_steps=10, guidance_steps=0).window == 0
    with pytest.raises(ValueError, match=r"guidance_steps must be in \[0, 10\]"):
        SamplingConfig(num_inference_steps=10, guidance_steps=11)


def test_layer_selection_validation():
    with pytest.raises(ValueError, match="layers.places"):
        LayerSelection(places=("side",))
    with pytest.raises(ValueError, match="at least one"):
        LayerSelection(places=())


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 65, "..", "dog cat", None])
def test_subject_id_validation(bad):
    with pytest.raises(ValueError, match="subject_id"):
        validate_subject_id(bad)


def test_to_dict_is_json_ready():
    d = to_dict(SamplingConfig(token_indices=(1, 2)))
    assert d["token_indices"] == [1, 2] and d["alpha"] == 0.25


# ---------------------------------------------------------------------------------- one source

import argparse  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from dreamblend_ray import config as cfg  # noqa: E402
from dreamblend_ray.config import FinetuneConfig  # noqa: E402


@pytest.mark.parametrize("config", [
    SamplingConfig(),
    SamplingConfig(alpha=0.0, guidance_steps=3, token_indices=(1, 2), eta_schedule="cosine",
                   layers=LayerSelection(places=("up",), resolutions=(8, 16), name_contains=("up_blocks.1",)),
                   height=64, width=32, return_reference=True),
    FinetuneConfig(),
    FinetuneConfig(method="full", checkpoint_steps=(5, 10), steps=10, lora_alpha=8.0, class_prompt="a dog",
                   target_modules=("to_q",), mixed_precision="bfloat16", gradient_checkpointing=False),
])
def test_to_dict_and_from_dict_round_trip_exactly_through_json(config):
    saved = json.loads(json.dumps(cfg.to_dict(config)))
    assert cfg.from_dict(type(config), saved) == config
    assert hash(cfg.from_dict(type(config), saved)) == hash(config)


def test_to_dict_is_recursive():
    saved = cfg.to_dict(SamplingConfig(layers=LayerSelection(resolutions=(8,))))
    assert saved["layers"] == {"places": ["down", "mid", "up"], "resolutions": [8], "num_lowest": 2,
                               "name_contains": [], "streams": ["double", "joint"], "blocks": [],
                               "normalisation": "text"}


def test_from_dict_refuses_unknown_keys_by_name():
    with pytest.raises(ValueError, match="alpah"):
        cfg.from_dict(SamplingConfig, {"alpah": 0.1})
    with pytest.raises(ValueError, match="nmu_lowest"):
        cfg.from_dict(SamplingConfig, {"layers": {"nmu_lowest": 1}})


def test_lists_and_dicts_become_frozen_hashable_values():
    config = SamplingConfig(token_indices=[1, 2], layers={"places": ["up"]})
    assert config.token_indices == (1, 2) and config.layers == LayerSelection(places=("up",))
    hash(config)


@pytest.mark.parametrize("cls", [SamplingConfig, FinetuneConfig, LayerSelection])
def test_every_field_is_declared_once_with_help(cls):
    from dataclasses import fields
    assert [f.name for f in fields(cls)] == cfg.settings_of(cls)
    for name in cfg.settings_of(cls):
        assert cfg.spec(cls, name).help


def _parser(cls):
    parser = argparse.ArgumentParser(exit_on_error=False)
    cfg.add_arguments(parser, cls, [n for n in cfg.settings_of(cls) if n != "layers"])
    return parser


def test_flags_are_the_field_names_and_defaults_come_from_the_dataclass():
    parser = _parser(SamplingConfig)
    assert cfg.from_args(SamplingConfig, parser.parse_args([])) == SamplingConfig()
    args = parser.parse_args(["--num-inference-steps", "12", "--alpha", "0.5", "--token-indices", "1", "3",
                              "--return-reference", "--eta-schedule", "cosine"])
    assert cfg.from_args(SamplingConfig, args) == SamplingConfig(
        num_inference_steps=12, alpha=0.5, token_indices=(1, 3), return_reference=True, eta_schedule="cosine")


def test_older_flag_spellings_keep_working():
    args = _parser(SamplingConfig).parse_args(["--steps", "7", "--reference"])
    assert cfg.from_args(SamplingConfig, args) == SamplingConfig(num_inference_steps=7, return_reference=True)
    args = _parser(FinetuneConfig).parse_args(["--lr", "0.001", "--mixed-precision", "float16",
                                               "--prior-preservation", "false"])
    config = cfg.from_args(FinetuneConfig, args)
    assert (config.learning_rate, config.mixed_precision, config.prior_preservation) == (0.001, "fp16", False)


def test_help_shows_bounds_and_default():
    text = _parser(SamplingConfig).format_help()
    assert "[0.0, 10.0] (default: 0.25)" in text


def test_a_bad_flag_value_is_a_value_error_naming_the_field():
    args = _parser(SamplingConfig).parse_args(["--alpha", "11"])
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 10.0\]"):
        cfg.from_args(SamplingConfig, args)


def test_a_registered_distance_is_accepted_without_touching_config(monkeypatch):
    from dreamblend_ray.method import guidance

    with pytest.raises(ValueError, match="distance must be one of"):
        SamplingConfig(distance="cosine-sim")
    monkeypatch.setitem(guidance.DISTANCES, "cosine-sim", guidance.DISTANCES["l1"])
    assert SamplingConfig(distance="cosine-sim").distance == "cosine-sim"


def test_one_seed_limit_everywhere():
    assert cfg.spec(FinetuneConfig, "seed").high == cfg.MAX_SEED
    FinetuneConfig(seed=cfg.MAX_SEED)
    with pytest.raises(ValueError, match="seed"):
        FinetuneConfig(seed=cfg.MAX_SEED + 1)


def test_a_subject_id_is_validated_once_and_carried_as_its_type(monkeypatch):
    checked = cfg.validate_subject_id("rex")
    assert isinstance(checked, cfg.SubjectId) and checked == "rex"
    calls, original = [], cfg.SUBJECT_ID_PATTERN

    class Counting:
        def fullmatch(self, text):
            calls.append(text)
            return original.fullmatch(text)

    monkeypatch.setattr(cfg, "SUBJECT_ID_PATTERN", Counting())
    assert cfg.validate_subject_id(checked) is checked and calls == []
    cfg.validate_subject_id("other")
    assert calls == ["other"]
    with pytest.raises(ValueError, match="subject_id must match"):
        cfg.validate_subject_id("bad\n")
