"""Shared fixtures: the tiny random model, built once per session, and quiet torch threading."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_components():
    from dreamblend_ray.components import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_components):
    """The tiny model saved in diffusers layout, for tests that load from a path."""
    from dreamblend_ray.components import save_components

    return save_components(tiny_components, tmp_path_factory.mktemp("tiny-model"))
