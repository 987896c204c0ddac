"""The gates a new embedded base must pass (floors and the baseline), without sampling."""

from __future__ import annotations

import pytest

from dreamblend_ray.embedded.gates import GateConfig, verdict

TODAY = {"held_out": 1.0, "both_shapes": 0.604}


def test_a_model_at_least_as_good_as_the_baseline_above_the_floors_passes():
    assert verdict({"held_out": 1.0, "both_shapes": 0.65}, TODAY)["passed"]
    assert verdict(dict(TODAY), TODAY)["passed"]


@pytest.mark.parametrize("candidate, failed", [
    ({"held_out": 0.993, "both_shapes": 0.7}, "held_out >= baseline"),
    ({"held_out": 1.0, "both_shapes": 0.59}, "both_shapes >= floor"),
    ({"held_out": 0.98, "both_shapes": 0.7}, "held_out >= floor"),
])
def test_each_miss_fails_its_own_check(candidate, failed):
    result = verdict(candidate, TODAY)
    assert not result["passed"] and not result["checks"][failed]


def test_without_a_baseline_only_the_floors_are_checked():
    result = verdict({"held_out": 0.995, "both_shapes": 0.61}, None)
    assert result["passed"] and set(result["checks"]) == {"held_out >= floor", "both_shapes >= floor"}


@pytest.mark.parametrize("field, value", [("min_pairs", 1.5), ("steps", 0), ("per_combo", 0)])
def test_gate_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        GateConfig(**{field: value})
