"""method/joint_attention.py: image-to-text maps of MMDiT joint attention, recorded through
set_attn_processor without changing the block's output, equal to a naive full-attention reference
(text-only softmax and the joint softmax), never on SD3.5's image-only attn2."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from dreamblend_ray.method import joint_attention as ja
from dreamblend_ray.method.attention import Recorder
from dreamblend_ray.models.components import build_tiny_components

KINDS = ["tiny-flux", "tiny-sd3"]


@pytest.fixture(scope="module", params=KINDS)
def components(request):
    return build_tiny_components(seed=0, name=request.param)


def _inputs(c, prompts):
    family = c.model_family
    text = family.encode(c, prompts)
    latents = family.pack(torch.randn(len(prompts), family.latent_channels(c), 16, 16,
                                      generator=torch.Generator().manual_seed(0)))
    t = torch.full((len(prompts),), 700.0)
    return latents, t, text


def _call(c, latents, t, text):
    return c.model_family.denoise(c.transformer, latents, t, text.embeds, {"pooled_projections": text.pooled},
                                  3.5, (16, 16))


class Capture:
    """Wraps a processor and keeps its inputs (for the naive reference)."""

    def __init__(self, original):
        self.original, self.calls = original, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        self.calls.append((attn, hidden_states, encoder_hidden_states, image_rotary_emb))
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)


def naive_maps(attn, hidden, context, rotary, normalisation):
    """The full (T+N)^2 joint attention of a double-stream/joint block, then its image-query x text-key block."""
    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    def norm(fn, x):
        return x if fn is None else fn(x)

    q_img, k_img = norm(attn.norm_q, heads(attn.to_q(hidden))), norm(attn.norm_k, heads(attn.to_k(hidden)))
    q_txt = norm(attn.norm_added_q, heads(attn.add_q_proj(context)))
    k_txt = norm(attn.norm_added_k, heads(attn.add_k_proj(context)))
    query, key = torch.cat([q_txt, q_img], 1), torch.cat([k_txt, k_img], 1)  # Flux's order: text first
    if rotary is not None:
        query, key = apply_rotary_emb(query, rotary, sequence_dim=1), apply_rotary_emb(key, rotary, sequence_dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", query, key) / query.shape[-1] ** 0.5
    length = context.shape[1]
    if normalisation == "joint":
        return logits.softmax(-1)[:, :, length:, :length].mean(1)
    return logits[:, :, length:, :length].softmax(-1).mean(1)


@pytest.mark.parametrize("normalisation", ["text", "joint"])
def test_maps_equal_the_naive_reference_and_the_output_is_unchanged(components, normalisation):
    c = components
    latents, t, text = _inputs(c, ["a photo of sks dog", "a red cat"])
    with torch.no_grad():
        plain = _call(c, latents, t, text)
    layers = ja.select_joint_layers(c.transformer)
    original = c.transformer.attn_processors
    captures = {layer.name: Capture(original[layer.name]) for layer in layers}
    c.transformer.set_attn_processor({**original, **captures})
    try:
        with torch.no_grad():
            _call(c, latents, t, text)
    finally:
        c.transformer.set_attn_processor(original)
    recorder = Recorder()
    with torch.no_grad(), ja.recording_joint(c.transformer, layers, recorder, normalisation), \
            recorder.capture(rows=slice(None)) as store:
        recorded = _call(c, latents, t, text)
    assert torch.equal(recorded, plain)  # the block's output is still the original processor's (SDPA)
    assert set(store.maps) == {layer.name for layer in layers}
    for name, capture in captures.items():
        attn, hidden, context, rotary = capture.calls[0]
        expected = naive_maps(attn, hidden, context, rotary, normalisation)
        assert store.maps[name].shape == (2, 64, text.embeds.shape[1])
        assert torch.allclose(store.maps[name], expected, atol=1e-6)
        sums = store.maps[name].sum(-1)
        if normalisation == "text":
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
        else:
            assert (sums < 1).all()


def test_layers_are_the_joint_blocks_never_sd35s_attn2(components):
    layers = ja.joint_layers(components.transformer)
    names = [layer.name for layer in layers]
    assert all(".attn.processor" in name and "attn2" not in name for name in names)
    if components.family == "sd3":
        assert "transformer_blocks.0.attn2.processor" in components.transformer.attn_processors
        assert {layer.stream for layer in layers} == {"joint"}
    else:
        assert [layer.stream for layer in layers] == ["double", "single"]
    with pytest.raises(ValueError, match="available"):
        ja.select_joint_layers(components.transformer, ("double", "joint"), (7,))


def test_flux_single_stream_maps_sum_to_one():
    c = build_tiny_components(name="tiny-flux")
    latents, t, text = _inputs(c, ["a photo of sks dog"])
    layers = ja.select_joint_layers(c.transformer, ("single",))
    recorder = Recorder()
    with torch.no_grad(), ja.recording_joint(c.transformer, layers, recorder), \
            recorder.capture(rows=slice(None)) as store:
        store.text_length = text.embeds.shape[1]
        _call(c, latents, t, text)
    (maps,) = store.maps.values()
    assert maps.shape == (1, 64, text.embeds.shape[1])
    assert torch.allclose(maps.sum(-1), torch.ones(1, 64), atol=1e-5)


def test_the_joint_log_sum_exp_is_chunked():
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 50, 3, 8, generator=gen), torch.randn(2, 50, 3, 8, generator=gen)
    full = torch.logsumexp(ja.image_text_logits(query, key), dim=-1)
    assert torch.allclose(ja.image_key_logsumexp(query, key, chunk=7), full, atol=1e-5)
    with pytest.raises(ValueError, match="normalisation"):
        ja.text_maps(torch.zeros(1, 1, 2, 3), "softmax")


def test_heat_map_words_are_t5s_at_their_place_in_the_text_axis(components):
    from dreamblend_ray.method.heatmaps import prompt_words

    tokenizer, offset = components.model_family.map_tokens(components)
    groups = prompt_words(tokenizer, "a photo of sks dog", offset)
    assert [w for w, _ in groups] == ["a", "photo", "of", "sks", "dog"]
    assert [p for _, p in groups] == [[offset + i] for i in range(5)]  # T5 has no start token
    text = components.model_family.encode(components, ["a photo of sks dog"])
    mask = components.model_family.token_mask(components, text.input_ids)
    assert mask[0].nonzero().flatten().tolist() == [p for _, (p,) in groups]  # the words are the guided tokens
