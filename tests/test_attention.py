import pytest
import torch
from peft import LoraConfig

from dreamblend_ray.method.attention import (
    Recorder, StopForward, cross_attention_layers, recording, select_layers,
)
from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.config import LayerSelection


@pytest.fixture
def unet():
    return build_tiny_components(seed=0).unet


def _call(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, 16, 16, generator=g)
    context = torch.randn(batch, 32, 32, generator=g)
    return unet(z, 500, encoder_hidden_states=context).sample


def test_layers_in_execution_order_with_resolutions(unet):
    layers = cross_attention_layers(unet)
    assert [(layer.place, layer.resolution) for layer in layers] == [
        ("down", 16), ("down", 8), ("mid", 8), ("up", 8), ("up", 8), ("up", 16), ("up", 16)]
    assert all(".attn2." in layer.name for layer in layers)


def test_default_selection_is_lowest_two_resolutions(unet):
    assert len(select_layers(unet, LayerSelection())) == 7
    lowest = select_layers(unet, LayerSelection(num_lowest=1))
    assert {layer.resolution for layer in lowest} == {8}
    ups = select_layers(unet, LayerSelection(places=("up",), resolutions=(16,)))
    assert [layer.name.split(".")[0:2] for layer in ups] == [["up_blocks", "1"]] * 2


def test_selecting_no_layer_is_an_error(unet):
    with pytest.raises(ValueError, match="no cross-attention layer matches"):
        select_layers(unet, LayerSelection(resolutions=(64,)))
    with pytest.raises(ValueError, match="no cross-attention layer matches"):
        select_layers(unet, LayerSelection(name_contains=("nonexistent",)))


def test_recording_matches_default_attention_and_restores(unet):
    before = unet.attn_processors
    expected = _call(unet)
    recorder = Recorder()
    layers = select_layers(unet, LayerSelection())
    with recording(unet, layers, recorder):
        with recorder.capture(rows=slice(1, 2)) as store:
            got = _call(unet)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(store.maps) == {layer.name for layer in layers}
    for name, maps in store.maps.items():
        assert maps.shape[0] == 1 and maps.shape[2] == 32
        torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)))
        assert maps.grad_fn is None
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_processors_restored_after_an_exception(unet):
    before = unet.attn_processors
    with pytest.raises(RuntimeError):
        with recording(unet, select_layers(unet, LayerSelection()), Recorder()):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_keep_graph_and_stop_after(unet):
    layers = select_layers(unet, LayerSelection(num_lowest=1))
    recorder = Recorder()
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    with recording(unet, layers, recorder), torch.enable_grad():
        with recorder.capture(rows=slice(None), keep_graph=True, stop_after=layers[-1].name) as store:
            with pytest.raises(StopForward):
                unet(z, 500, encoder_hidden_states=torch.randn(1, 32, 32))
        total = sum(m.sum() for m in store.maps.values())
        (grad,) = torch.autograd.grad(sum((m ** 2).sum() for m in store.maps.values()), z)
    assert len(store.maps) == len(layers)
    assert torch.isfinite(total) and grad.abs().sum() > 0


def test_lora_adapters_apply_through_the_processor(unet):
    layers = select_layers(unet, LayerSelection())
    recorder = Recorder()

    def maps():
        with recording(unet, layers, recorder), recorder.capture(rows=slice(None)) as store:
            _call(unet, batch=1)
        return store.maps

    base = maps()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="x")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapted = maps()
    assert any(not torch.allclose(base[k], adapted[k], atol=1e-4) for k in base)
