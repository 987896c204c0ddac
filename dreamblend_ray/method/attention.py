"""Recording cross-attention probabilities through ``unet.set_attn_processor``.

``recording(unet, layers, recorder)`` installs a :class:`RecordingProcessor` on each selected
cross-attention layer (self-attention keeps its processor) and restores the original processors on
exit. The processor computes attention exactly as diffusers' ``AttnProcessor`` does, through
``attn.to_q/to_k/to_v/to_out`` (so peft LoRA adapters apply), and hands the probabilities to an
:class:`AttentionStore` that belongs to one UNet call (``recorder.capture(...)``): no global
state.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

from dreamblend_ray.config import LayerSelection

_NAME = re.compile(r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\."
                   r"transformer_blocks\.(\d+)\.attn2\.processor$")
_PLACE = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2}


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer: its processor name, place, block index and latent side length."""

    name: str
    place: str
    block: int
    resolution: int
    order: tuple[int, int, int, int]


def cross_attention_layers(unet) -> list[CrossAttentionLayer]:
    """Every cross-attention layer of ``unet`` in forward-execution order.

    ``resolution`` is the layer's latent side length at the UNet's default ``sample_size``.
    """
    levels = len(unet.config.block_out_channels)
    size = int(unet.config.sample_size)
    layers = []
    for name in unet.attn_processors:
        match = _NAME.match(name)
        if not match:
            continue
        prefix, block, attention, transformer = match.groups()
        place = _PLACE[prefix]
        block_index = int(block) if block else 0
        level = {"down": block_index, "mid": levels - 1, "up": levels - 1 - block_index}[place]
        order = (_PLACE_ORDER[place], block_index, int(attention), int(transformer))
        layers.append(CrossAttentionLayer(name, place, block_index, size // 2 ** level, order))
    return sorted(layers, key=lambda layer: layer.order)


def select_layers(unet, selection: LayerSelection) -> list[CrossAttentionLayer]:
    """The layers ``selection`` names; raises ValueError when none match."""
    layers = [layer for layer in cross_attention_layers(unet) if layer.place in selection.places]
    resolutions = selection.resolutions or tuple(
        sorted({layer.resolution for layer in layers})[: selection.num_lowest])
    layers = [layer for layer in layers if layer.resolution in resolutions]
    if selection.name_contains:
        layers = [layer for layer in layers
                  if any(part in layer.name for part in selection.name_contains)]
    if not layers:
        available = sorted({(layer.place, layer.resolution) for layer in cross_attention_layers(unet)})
        raise ValueError(f"layers: no cross-attention layer matches {selection}; "
                         f"available (place, resolution): {available}")
    return layers


class StopForward(Exception):
    """Raised after the last recorded layer when the rest of the UNet is not needed."""


@dataclass
class AttentionStore:
    """Cross-attention maps of one UNet call, per layer, shape ``(B, H*W, T)`` (head mean).

    rows: which rows of the UNet batch to keep (e.g. the conditional half under CFG).
    keep_graph: keep autograd history (E's gradient pass) or detach (G, measurements).
    stop_after: a layer name after which the forward pass is cut short with StopForward.
    """

    rows: slice
    keep_graph: bool = False
    stop_after: str | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    text_length: int = 0  # Flux's single-stream blocks: the text tokens leading their one sequence

    def record(self, name: str, probs: torch.Tensor, heads: int) -> None:
        batch_heads, pixels, tokens = probs.shape
        maps = probs.view(batch_heads // heads, heads, pixels, tokens).mean(dim=1)[self.rows]
        self.maps[name] = maps if self.keep_graph else maps.detach()


class Recorder:
    """Routes the probabilities of the installed processors to the store of the current call."""

    def __init__(self):
        self.store: AttentionStore | None = None

    @contextmanager
    def capture(self, rows: slice, keep_graph: bool = False, stop_after: str | None = None):
        """Record one UNet call into a fresh :class:`AttentionStore`."""
        self.store = AttentionStore(rows=rows, keep_graph=keep_graph, stop_after=stop_after)
        try:
            yield self.store
        finally:
            self.store = None


class RecordingProcessor:
    """diffusers' ``AttnProcessor`` maths, with the probabilities handed to the recorder's store."""

    def __init__(self, name: str, recorder: Recorder):
        self.name = name
        self.recorder = recorder

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        store = self.recorder.store
        if store is not None:
            store.record(self.name, probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        if store is not None and store.stop_after == self.name:
            raise StopForward
        return hidden_states


@contextmanager
def recording(unet, layers: list[CrossAttentionLayer], recorder: Recorder):
    """Install recording processors on ``layers`` of ``unet``; restore the originals on exit."""
    if not layers:
        raise ValueError("layers: recording needs at least one cross-attention layer")
    original = unet.attn_processors
    selected = {layer.name for layer in layers}
    missing = selected - set(original)
    if missing:
        raise ValueError(f"layers: {sorted(missing)} are not attention layers of this UNet")
    processors = {name: RecordingProcessor(name, recorder) if name in selected else processor
                  for name, processor in original.items()}
    unet.set_attn_processor(processors)
    try:
        yield recorder
    finally:
        unet.set_attn_processor(original)
