"""A fine-tune's resume point: enough state to continue a run exactly where its last checkpoint was.

``subjects/{id}/checkpoints/resume.safetensors`` is rewritten (atomically) at every checkpoint of a
run the service may have to resume. It holds, as safetensors (never a pickle):

- ``param.{i}``: the trainable parameters, in the order the optimizer holds them;
- ``adam.{i}.exp_avg``, ``adam.{i}.exp_avg_sq``, ``adam.{i}.step``: AdamW's state;
- ``rng.index`` / ``rng.noise``: the two generators' states (uint8 tensors);
- metadata ``step``: the optimizer steps done.

A worker killed after step N's checkpoint resumes at N + 1 with the same parameters, moments and
random streams, so (on one device) the resumed run's checkpoints equal an uninterrupted run's.
The file is removed when the run ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamblend_ray.io import storage
from dreamblend_ray.training import layout
from dreamblend_ray.training.checkpoints import decode_safetensors, encode_safetensors

RESUME_NAME = "resume.safetensors"


def resume_uri(root: str, subject_id: str) -> str:
    return storage.join(layout.subject_uri(root, subject_id), "checkpoints", RESUME_NAME)


@dataclass
class ResumeState:
    step: int
    tensors: dict[str, torch.Tensor]


def capture(step: int, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
            generators: dict[str, torch.Generator]) -> bytes:
    """The resume point after ``step`` optimizer steps, as safetensors bytes."""
    tensors = {f"param.{i}": p.detach() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    return encode_safetensors(tensors, {"step": str(int(step))})


def save(root: str, subject_id: str, data: bytes) -> None:
    storage.write_bytes(resume_uri(root, subject_id), data)


def load(root: str, subject_id: str) -> ResumeState | None:
    """The saved resume point, or None when there is none."""
    uri = resume_uri(root, subject_id)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    tensors, metadata = decode_safetensors(data, uri)
    if "step" not in metadata:
        raise ValueError(f"{RESUME_NAME} of subject {subject_id!r} has no step")
    return ResumeState(int(metadata["step"]), tensors)


def restore(state: ResumeState, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
            generators: dict[str, torch.Generator]) -> int:
    """Put the saved parameters, AdamW moments and generator states back; the step to go on after."""
    if sum(k.startswith("param.") for k in state.tensors) != len(params):
        raise ValueError("the resume point holds another set of trainable parameters than this run")
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = state.tensors[f"param.{i}"]
            if saved.shape != p.shape:
                raise ValueError(f"the resume point's parameter {i} has shape {tuple(saved.shape)}, "
                                 f"not {tuple(p.shape)}")
            p.copy_(saved.to(p.device, p.dtype))
            moments = {k.rsplit(".", 1)[1]: v for k, v in state.tensors.items() if k.startswith(f"adam.{i}.")}
            if moments:
                optimizer.state[p] = {k: v.to(p.device) if k != "step" else v.clone() for k, v in moments.items()}
    for name, gen in generators.items():
        gen.set_state(state.tensors[f"rng.{name}"])
    return state.step


def discard(root: str, subject_id: str) -> None:
    storage.delete(resume_uri(root, subject_id))
