"""Recording image-to-text attention in MMDiT joint attention (Flux, SD3) through ``set_attn_processor``.

In a joint block, image and text tokens attend to each other in one softmax. The image-query x
text-key block of that attention carries per-word maps (ConceptAttention, arXiv 2502.04320). A
:class:`JointRecordingProcessor` wraps a block's own processor: it projects the image queries and
the text keys exactly as the block does (``to_q``/``norm_q``, ``add_k_proj``/``norm_added_k``, and
Flux's rotary embedding; so peft LoRA adapters apply), records ``(B, N_img, T)`` maps averaged over
heads, then calls the original processor, which computes the block's output with SDPA. The
``N^2`` image-image matrix is never materialised.

Normalisations (``normalisations``): ``"text"`` (default) is the softmax over the text tokens only,
so a pixel's map sums to 1 over the prompt, as cross-attention's does and as the L1 distance's
bound assumes; ``"joint"`` is the block's own probabilities (softmax over text and image keys)
restricted to the text keys, with the image keys' log-sum-exp accumulated in chunks.

Layers: Flux's double-stream blocks (``transformer_blocks.i.attn``, stream ``"double"``) and its
single-stream blocks (``single_transformer_blocks.i.attn``, stream ``"single"``: text and image in
one sequence, text first); SD3's joint blocks (``transformer_blocks.i.attn``, stream ``"joint"``),
never SD3.5's image-only ``attn2``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb

from dreamblend_ray.method.attention import Recorder, StopForward

_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor$")
NORMALISATIONS = ("text", "joint")
KEY_CHUNK = 1024  # image keys per chunk of the joint normalisation's log-sum-exp


@dataclass(frozen=True)
class JointLayer:
    """One joint-attention layer: its processor name, stream and block index (execution order)."""

    name: str
    stream: str
    block: int


def joint_layers(transformer) -> list[JointLayer]:
    """Every text-image attention layer of ``transformer`` in execution order."""
    double = "double" if hasattr(transformer, "single_transformer_blocks") else "joint"
    layers = []
    for name in transformer.attn_processors:
        match = _NAME.match(name)
        if match:
            stream = double if match.group(1) == "transformer_blocks" else "single"
            layers.append(JointLayer(name, stream, int(match.group(2))))
    return sorted(layers, key=lambda layer: (layer.stream == "single", layer.block))


def select_joint_layers(transformer, streams: tuple[str, ...] = ("double", "joint"),
                        blocks: tuple[int, ...] = ()) -> list[JointLayer]:
    """The layers of ``streams`` (and of ``blocks`` when given); ValueError when none match."""
    layers = [layer for layer in joint_layers(transformer) if layer.stream in streams
              and (not blocks or layer.block in blocks)]
    if not layers:
        available = sorted({(layer.stream, layer.block) for layer in joint_layers(transformer)})
        raise ValueError(f"layers: no joint-attention layer of streams {list(streams)} and blocks "
                         f"{list(blocks) or 'any'}; available (stream, block): {available}")
    return layers


def image_text_logits(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``(B, N, H, d)`` image queries x ``(B, T, H, d)`` text keys -> ``(B, H, N, T)`` scaled logits."""
    return torch.einsum("bnhd,bthd->bhnt", query, key) * query.shape[-1] ** -0.5


def image_key_logsumexp(query: torch.Tensor, image_key: torch.Tensor, chunk: int = KEY_CHUNK) -> torch.Tensor:
    """``(B, H, N)``: log-sum-exp over the image keys of each image query's logits, ``chunk`` keys
    at a time (memory ``N x chunk``, never ``N x N``)."""
    total = None
    for start in range(0, image_key.shape[1], chunk):
        part = torch.logsumexp(image_text_logits(query, image_key[:, start:start + chunk]), dim=-1)
        total = part if total is None else torch.logaddexp(total, part)
    return total


def text_maps(logits: torch.Tensor, normalisation: str = "text",
              image_lse: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, N, T)`` logits -> ``(B, N, T)`` maps averaged over heads.

    ``"text"``: softmax over T. ``"joint"``: ``exp(logit - lse)`` with the log-sum-exp over the text
    logits and ``image_lse`` ``(B, H, N)`` (the image keys'), i.e. the block's own probabilities.
    """
    if normalisation == "text":
        return logits.softmax(dim=-1).mean(dim=1)
    if normalisation == "joint":
        lse = torch.logaddexp(torch.logsumexp(logits, dim=-1), image_lse)
        return (logits - lse[..., None]).exp().mean(dim=1)
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    """``(B, L, H*d)`` -> ``(B, L, H, d)``."""
    return x.unflatten(-1, (attn.heads, -1))


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _rotary(x: torch.Tensor, rotary, rows: slice) -> torch.Tensor:
    if rotary is None:
        return x
    cos, sin = rotary
    return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=1)


def project(attn, hidden_states, encoder_hidden_states, rotary, text_length: int):
    """Image queries ``(B, N, H, d)``, text keys ``(B, T, H, d)`` and image keys, as the block
    computes them (Flux's fused projections are not supported)."""
    if getattr(attn, "fused_projections", False):
        raise ValueError("joint-attention recording does not support fused QKV projections; unfuse them")
    if encoder_hidden_states is None:  # Flux single-stream: [text; image] in one sequence
        query = _norm(attn.norm_q, _heads(attn.to_q(hidden_states), attn))
        key = _norm(attn.norm_k, _heads(attn.to_k(hidden_states), attn))
        query, key = _rotary(query, rotary, slice(None)), _rotary(key, rotary, slice(None))
        return query[:, text_length:], key[:, :text_length], key[:, text_length:]
    length = encoder_hidden_states.shape[1]
    query = _norm(attn.norm_q, _heads(attn.to_q(hidden_states), attn))
    image_key = _norm(attn.norm_k, _heads(attn.to_k(hidden_states), attn))
    text_key = _norm(attn.norm_added_k, _heads(attn.add_k_proj(encoder_hidden_states), attn))
    text_rows, image_rows = slice(0, length), slice(length, None)  # Flux's rotary table: text first
    return (_rotary(query, rotary, image_rows), _rotary(text_key, rotary, text_rows),
            _rotary(image_key, rotary, image_rows))


class JointRecordingProcessor:
    """Records the image-to-text maps of one joint layer, then runs the layer's own processor."""

    def __init__(self, name: str, recorder: Recorder, original, normalisation: str = "text"):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.name, self.recorder, self.original, self.normalisation = name, recorder, original, normalisation

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        store = self.recorder.store
        if store is not None:
            self.record(store, attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if store is not None and store.stop_after == self.name:
            raise StopForward
        return out

    def record(self, store, attn, hidden_states, encoder_hidden_states, rotary) -> None:
        query, text_key, image_key = project(attn, hidden_states, encoder_hidden_states, rotary,
                                             store.text_length)
        logits = image_text_logits(query, text_key)
        lse = image_key_logsumexp(query, image_key) if self.normalisation == "joint" else None
        maps = text_maps(logits.float(), self.normalisation, None if lse is None else lse.float())
        store.record(self.name, maps, 1)


@contextmanager
def recording_joint(transformer, layers: list[JointLayer], recorder: Recorder, normalisation: str = "text"):
    """Install recording processors on ``layers`` of ``transformer``; restore the originals on exit."""
    if not layers:
        raise ValueError("layers: recording needs at least one joint-attention layer")
    original = transformer.attn_processors
    missing = {layer.name for layer in layers} - set(original)
    if missing:
        raise ValueError(f"layers: {sorted(missing)} are not attention layers of this transformer")
    selected = {layer.name for layer in layers}
    processors = {name: JointRecordingProcessor(name, recorder, processor, normalisation)
                  if name in selected else processor for name, processor in original.items()}
    transformer.set_attn_processor(processors)
    try:
        yield recorder
    finally:
        transformer.set_attn_processor(original)
