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
