"""Growing the embedded UNet: attention at its 16x16 level, output unchanged until trained."""

from __future__ import annotations

import pytest
import torch

from dreamblend_ray.config import LayerSelection
from dreamblend_ray.embedded import grow
from dreamblend_ray.embedded.train import build_models
from dreamblend_ray.method.attention import cross_attention_layers, select_layers


@pytest.fixture(scope="module")
def unets():
    """The embedded UNet as it was before growing (its architecture, seeded weights with every
    output projection perturbed, so that no zero elsewhere hides a difference) and its grown copy."""
    old = build_models(seed=0)[1].eval()
    with torch.no_grad():
        for name, parameter in old.named_parameters():
            if "proj_out" in name or "conv_out" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return old, grow.grow_unet(old)


def fixed_inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    hidden = torch.randn(batch, 16, 64, generator=generator)
    return latents, torch.tensor([0, 250, 600, 999][:batch]), hidden


@torch.no_grad()
def outputs(unet, inputs):
    latents, timesteps, hidden = inputs
    return unet(latents, timesteps, encoder_hidden_states=hidden).sample


def test_grown_unet_computes_exactly_what_the_old_one_does(unets):
    old, grown = unets
    inputs = fixed_inputs()
    assert (outputs(old, inputs) - outputs(grown, inputs)).abs().max().item() == 0.0
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in old.parameters())


def test_growing_leaves_the_old_unet_untouched(unets):
    old, _ = unets
    assert old.config.down_block_types[0] == "DownBlock2D"
    assert not hasattr(old.down_blocks[0], "attentions")


def test_grown_unet_has_attention_at_16x16_that_selection_and_lora_see(unets):
    _, grown = unets
    resolutions = {layer.resolution for layer in cross_attention_layers(grown)}
    assert 16 in resolutions
    chosen = select_layers(grown, LayerSelection(resolutions=(16,)))
    assert {layer.place for layer in chosen} == {"down", "up"}
    names = [name for name, _ in grown.named_modules()]
    for prefix in ("down_blocks.0.attentions.0", f"up_blocks.{len(grown.up_blocks) - 1}.attentions.0"):
        for projection in ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"):
            assert f"{prefix}.transformer_blocks.0.{projection}" in names


def test_grown_unet_round_trips_through_from_pretrained(unets, tmp_path):
    from diffusers import UNet2DConditionModel

    _, grown = unets
    grown.save_pretrained(tmp_path, safe_serialization=True)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert loaded.config.down_block_types[0] == "CrossAttnDownBlock2D"
    inputs = fixed_inputs(2)
    assert torch.equal(outputs(loaded, inputs), outputs(grown, inputs))


def test_training_the_new_blocks_changes_the_output(unets):
    _, grown = unets
    trained = grow.grow_unet(unets[0])
    with torch.no_grad():
        trained.down_blocks[0].attentions[0].proj_out.weight.fill_(0.01)
    inputs = fixed_inputs(2)
    assert (outputs(trained, inputs) - outputs(grown, inputs)).abs().max().item() > 0


def test_grown_config_rejects_what_it_cannot_grow():
    config = {"down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",)}
    with pytest.raises(ValueError, match="nothing to grow"):
        grow.grown_config(config)
    with pytest.raises(ValueError, match="SimpleDownBlock"):
        grow.grown_config({"down_block_types": ("SimpleDownBlock2D", "DownBlock2D"),
                           "up_block_types": ("UpBlock2D",)})


def test_grown_config_names_cross_attention_blocks_everywhere():
    config = {"_class_name": "UNet2DConditionModel", "block_out_channels": (32, 64),
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
    grown = grow.grown_config(config)
    assert grown["down_block_types"] == ("CrossAttnDownBlock2D",) * 2
    assert grown["up_block_types"] == ("CrossAttnUpBlock2D",) * 2
    assert "_class_name" not in grown and grown["block_out_channels"] == (32, 64)


@pytest.mark.slow
def test_grow_from_writes_a_grown_model_with_checkpoints(tmp_path):
    import json

    from dreamblend_ray.embedded.train import TrainConfig, train, train_grown
    from dreamblend_ray.models.components import load_components

    threads = torch.get_num_threads()
    try:
        base = train(tmp_path / "base", TrainConfig(scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, batch=4,
                                                    decoder_steps=2, decoder_scenes=64, compose_steps=0, threads=1))
        stage = TrainConfig(compose_steps=2, compose_scenes=64, batch=4, checkpoint_every=1, threads=1)
        out = train_grown(tmp_path / "grown", stage, grow_from=base)
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    grown = load_components(str(out))
    assert grown.unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert any(grown.unet.down_blocks[0].attentions[0].proj_out.weight.flatten() != 0)
    meta = json.loads((out / "training.json").read_text())
    assert meta["grown_from"] == str(base) and meta["compose_steps_done"] == 2
    assert meta["config"]["scenes"] == 64  # the base run's record is kept


def test_the_shipped_embedded_model_is_grown():
    from dreamblend_ray.models.components import load_components

    unet = load_components("embedded").unet
    assert 16 in {layer.resolution for layer in cross_attention_layers(unet)}
    assert unet.down_blocks[0].attentions[0].proj_out.weight.abs().max() > 0  # trained, not fresh
