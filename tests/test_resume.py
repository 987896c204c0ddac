"""A fine-tune killed after a checkpoint resumes exactly (training/resume.py): same parameters, AdamW
moments and random streams, so the resumed run's checkpoints equal an uninterrupted run's."""

import pytest

from ball_subjects import ball_images  # tests/ is on sys.path
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.io import storage
from dreamblend_ray.training import layout, resume
from dreamblend_ray.training.checkpoints import decode_safetensors
from dreamblend_ray.training.finetune import finetune_subject

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = FinetuneConfig(steps=6, learning_rate=5e-2, prior_preservation=False, checkpoint_steps=(2, 4, 6),
                        device="cpu", method="lora")


def weights(root, subject_id, step):
    tensors, _ = decode_safetensors(storage.read_bytes(layout.weight_uri(root, subject_id, step, "lora")))
    return tensors


class Killed(RuntimeError):
    pass


def stop_at(step_to_die: int):
    def callback(step, loss):
        if step == step_to_die:
            raise Killed(step)
    return callback


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_resumed_run_equals_an_uninterrupted_one(tiny_components, tmp_path, method):
    config = FinetuneConfig(**{**CONFIG.__dict__, "method": method})
    images = ball_images((255, 0, 0))
    whole = str(tmp_path / "whole")
    finetune_subject(tiny_components, images, "ball", "red", whole, config, progress=False, resumable=True)
    cut = str(tmp_path / "cut")
    with pytest.raises(Killed):  # dies at step 5, after step 4's checkpoint and resume point
        finetune_subject(tiny_components, images, "ball", "red", cut, config, progress=False,
                         callback=stop_at(5), resumable=True)
    assert not layout.is_complete(cut, "red")
    assert resume.load(cut, "red").step == 4
    steps_seen = []
    manifest = finetune_subject(tiny_components, images, "ball", "red", cut, config, progress=False,
                                callback=lambda step, loss: steps_seen.append(step), resumable=True)
    assert steps_seen == [5, 6]  # only what was left
    assert manifest["steps"] == [2, 4, 6] and manifest["timings"]["resumed_after_step"] == 4
    kind = layout.WEIGHT_NAMES[method]
    for step in (2, 4, 6):
        a = storage.read_bytes(storage.join(layout.checkpoint_uri(whole, "red", step), kind))
        b = storage.read_bytes(storage.join(layout.checkpoint_uri(cut, "red", step), kind))
        ta, tb = decode_safetensors(a)[0], decode_safetensors(b)[0]
        assert ta.keys() == tb.keys()
        assert all((ta[k] == tb[k]).all() for k in ta), step
    assert resume.load(cut, "red") is None  # removed once the run ended


def test_without_resumable_a_rerun_starts_over(tiny_components, tmp_path):
    root = str(tmp_path)
    with pytest.raises(Killed):
        finetune_subject(tiny_components, ball_images((0, 0, 255)), "ball", "blue", root, CONFIG,
                         progress=False, callback=stop_at(3))
    assert resume.load(root, "blue") is None  # only resumable runs keep a resume point
    steps_seen = []
    finetune_subject(tiny_components, ball_images((0, 0, 255)), "ball", "blue", root, CONFIG, progress=False,
                     callback=lambda step, loss: steps_seen.append(step))
    assert steps_seen == [1, 2, 3, 4, 5, 6]


def test_a_resume_point_of_another_run_is_refused(tiny_components, tmp_path):
    root = str(tmp_path)
    with pytest.raises(Killed):
        finetune_subject(tiny_components, ball_images((0, 255, 0)), "ball", "green", root, CONFIG,
                         progress=False, callback=stop_at(3), resumable=True)
    other = FinetuneConfig(**{**CONFIG.__dict__, "rank": 8})
    with pytest.raises(ValueError, match="shape"):
        finetune_subject(tiny_components, ball_images((0, 255, 0)), "ball", "green", root, other,
                         progress=False, resumable=True)
