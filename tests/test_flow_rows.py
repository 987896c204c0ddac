"""method/flow_rows.py: Flux and SD3 rows of different subjects, settings and step counts share
transformer calls (G co-batched into E's), and every row's image is the sampler's for that row alone
within one 8-bit level, including a row that joins while the others are half-way."""

import sys
from pathlib import Path

import numpy as np
import pytest

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method.flow_rows import FlowRowEngine, row_engine
from dreamblend_ray.method.pair import AdapterPair
from dreamblend_ray.method.rows import RowEngine, RowRequest
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models.components import build_tiny_components

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_sampler import add_adapters  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEVEL = 1 / 255


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-sd3"])
def components(request):
    c = build_tiny_components(name=request.param)
    add_adapters(c.transformer)
    return c


def requests(c):
    # rows of one step share CFG or not: Flux's true CFG on every row (the empty negative where none is given)
    true_cfg = {"true_cfg_scale": 4.0} if c.family == "flux" else {}
    return [RowRequest("a photo of sks dog", 1, SamplingConfig(num_inference_steps=5, alpha=0.5, step_size=3.0,
                                                               guidance_steps=3, **true_cfg), "early", "late"),
            RowRequest("a red cat", 2, SamplingConfig(num_inference_steps=4, alpha=0.0, guidance_scale=5.0,
                                                      **true_cfg),
                       "late", "late", negative_prompt="a cat"),
            RowRequest("a toy on the beach", 3, SamplingConfig(num_inference_steps=6, alpha=0.3, guidance_steps=6,
                                                               **true_cfg), "late", "early")]


def alone(c, request):
    pair = AdapterPair(c.transformer, request.guidance_adapter, request.edit_adapter)
    negatives = None if request.negative_prompt is None else [request.negative_prompt]
    return DreamBlendSampler(c).sample(pair, [request.prompt], [request.seed], request.config, negatives).arrays[0]


@pytest.mark.parametrize("co_batch", [True, False])
def test_each_row_is_its_image_alone_even_when_it_joins_late(components, co_batch):
    c = components
    engine = row_engine(c, co_batch=co_batch)
    assert isinstance(engine, FlowRowEngine)
    first, late = requests(c)[:2], requests(c)[2]
    rows = engine.start_many(first)
    active = list(rows)
    for _ in range(2):  # the others are two steps in when the third row joins
        engine.step(active)
    rows.append(engine.start(late))
    active = [row for row in rows if not row.done]
    while active:
        engine.step(active)
        active = [row for row in active if not row.done]
    for row, request in zip(rows, requests(c)):
        assert np.abs(engine.decode([row])[0] - alone(c, request)).max() < LEVEL
    assert rows[0].distances and not rows[1].distances  # the guided row measured its distance


def test_the_unet_engine_refuses_and_flux_rows_refuse_negative_prompts():
    c = build_tiny_components(name="tiny-flux")
    with pytest.raises(ValueError, match="FlowRowEngine"):
        RowEngine(c)
    with pytest.raises(ValueError, match="true_cfg_scale > 1"):
        FlowRowEngine(c).start(RowRequest("a dog", 1, SamplingConfig(num_inference_steps=2), negative_prompt="x"))
    with pytest.raises(ValueError, match="true_cfg_scale is FLUX.1's"):
        FlowRowEngine(build_tiny_components(name="tiny-sd3")).start(
            RowRequest("a dog", 1, SamplingConfig(num_inference_steps=2, true_cfg_scale=2.0)))
    with pytest.raises(ValueError, match="flow-matching"):
        FlowRowEngine(build_tiny_components(name="tiny"))
    assert type(row_engine(build_tiny_components(name="tiny"))) is RowEngine
