"""The model deployment's Serve health check (issue 21: the deep check belongs to Serve, not to the
Kubernetes readiness probes, which KubeRay injects: raylet health plus the proxy's /-/healthz)."""

from types import SimpleNamespace

import pytest
import torch

from dreamblend_ray.serving.app import DreamBlendModel

Replica = DreamBlendModel.func_or_class  # the class Serve instantiates per replica


def bare_replica(**fields):
    replica = Replica.__new__(Replica)  # no __init__: no base model loaded
    replica.__dict__.update(fields)
    return replica


def test_check_health_needs_a_loaded_base_model(tiny_components):
    with pytest.raises(RuntimeError, match="not loaded"):
        bare_replica().check_health()
    bare_replica(components=tiny_components, sampler=object()).check_health()  # CPU: healthy


def test_check_health_fails_when_the_gpu_is_lost(monkeypatch):
    asked = []

    def lost(device):
        asked.append(device)
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(torch.cuda, "mem_get_info", lost)
    replica = bare_replica(components=SimpleNamespace(device=torch.device("cuda", 0)), sampler=object())
    with pytest.raises(RuntimeError, match="CUDA error"):
        replica.check_health()
    assert asked == [torch.device("cuda", 0)]
