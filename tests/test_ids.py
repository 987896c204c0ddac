"""Ids and key parts are validated with fullmatch: a trailing newline, carriage return or NUL never
passes (``re.match`` with ``$`` accepted "alpha\\n", which reached storage as ``subjects/alpha\\n/``)."""

import pytest

from dreamblend_ray.serving import requests as serving
from dreamblend_ray.config import FinetuneConfig, validate_class_noun, validate_subject_id
from dreamblend_ray.jobs.common import validate_run_id

TAILS = ["\n", "\r", "\x00", "\r\n"]


@pytest.mark.parametrize("tail", TAILS)
def test_subject_id_with_a_control_tail_is_refused(tail):
    assert validate_subject_id("alpha") == "alpha"
    with pytest.raises(ValueError, match="subject_id"):
        validate_subject_id("alpha" + tail)


@pytest.mark.parametrize("tail", TAILS)
def test_run_id_class_noun_and_token_with_a_control_tail_are_refused(tail):
    with pytest.raises(ValueError, match="run_id"):
        validate_run_id("20260101-run" + tail)
    with pytest.raises(ValueError, match="class_noun"):
        validate_class_noun("dog" + tail)
    with pytest.raises(ValueError, match="token"):
        FinetuneConfig(token="sks" + tail)


@pytest.mark.parametrize("tail", TAILS)
def test_model_id_with_a_control_tail_is_refused(tail):
    assert serving.parse_model_id("alpha@g2") == ("default", "alpha", 2, None)
    assert serving.parse_model_id("acme~alpha@g2") == ("acme", "alpha", 2, None)
    with pytest.raises(ValueError):
        serving.parse_model_id("alpha" + tail)
    with pytest.raises(ValueError):
        serving.parse_model_id("alpha" + tail + "@g2")
    with pytest.raises(ValueError):
        serving.parse_model_id("acme" + tail + "~alpha")


def test_manifest_config_hash_with_a_newline_is_refused():
    from dreamblend_ray.training.layout import validate_manifest

    manifest = {"version": 1, "subject_id": "alpha", "class_noun": "dog", "token": "sks",
                "instance_prompt": "a sks dog", "base": {"source": "tiny", "config_sha256": "ab" * 32},
                "kind": "lora", "steps": [2, 4], "guidance_step": 2, "edit_step": 4, "loss_curve": [],
                "config": {}, "timings": {}, "library_versions": {}}
    assert validate_manifest(manifest)
    manifest["base"]["config_sha256"] = "ab" * 32 + "\n"
    with pytest.raises(ValueError, match="config_sha256"):
        validate_manifest(manifest)
