"""Per-token cross-attention heat maps: maths only (the sampler records, ``heatmap_report`` draws).

A UNet call's recorded maps are ``{layer: (B, h_l*w_l, T)}`` at each layer's own resolution.
:func:`layer_grid` puts them on one spatial grid (the finest selected layer's) and averages over
layers, :class:`MapAverager` averages that over the steps of a range, and :func:`word_maps` sums
the tokens of each word (a CLIP BPE word can be several tokens, as DAAM groups them).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

WORD_END = "</w>"
WORD_START = "\u2581"  # sentencepiece's metaspace: T5's tokens that start a word


def layer_shape(pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` of a layer holding ``pixels`` positions of a ``latent_hw`` latent (same aspect)."""
    height, width = latent_hw
    factor = math.sqrt(height * width / pixels)
    shape = (round(height / factor), round(width / factor))
    if shape[0] * shape[1] != pixels:
        raise ValueError(f"a layer with {pixels} positions does not tile a {height}x{width} latent")
    return shape


def layer_grid(maps: dict[str, torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """``{layer: (B, h*w, T)}`` -> ``(B, T, H, W)``: each layer upsampled (bilinear) to the finest
    layer's ``(H, W)``, then the mean over layers."""
    if not maps:
        raise ValueError("maps must hold at least one layer")
    grids = []
    for probs in maps.values():
        batch, pixels, tokens = probs.shape
        h, w = layer_shape(pixels, latent_hw)
        grids.append(probs.float().transpose(1, 2).reshape(batch, tokens, h, w))
    size = max((g.shape[-2:] for g in grids), key=lambda s: s[0] * s[1])
    resized = [g if g.shape[-2:] == size else
               F.interpolate(g, size=tuple(size), mode="bilinear", align_corners=False) for g in grids]
    return torch.stack(resized).mean(dim=0)


class MapAverager:
    """The running mean over steps of :func:`layer_grid` (detached, on the CPU)."""

    def __init__(self, latent_hw: tuple[int, int]):
        self.latent_hw = latent_hw
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, maps: dict[str, torch.Tensor]) -> None:
        grid = layer_grid({k: v.detach() for k, v in maps.items()}, self.latent_hw).cpu()
        self.total = grid if self.total is None else self.total + grid
        self.count += 1

    def mean(self) -> torch.Tensor | None:
        """``(B, T, H, W)``, or None when nothing was added."""
        return None if self.total is None else self.total / self.count


def word_groups(tokens: list[str], special: set[str]) -> list[tuple[str, list[int]]]:
    """Words of a tokenized prompt and their positions in the sequence (start-of-text is 0).

    ``tokens``: the prompt's BPE tokens in order, special tokens included. A token ending in
    ``</w>`` closes a word (CLIP), a token starting with ``\u2581`` opens one (T5's sentencepiece);
    special tokens (start, end, padding) belong to no word.
    """
    words, current, positions = [], "", []
    for position, token in enumerate(tokens):
        if token in special:
            continue
        if token.startswith(WORD_START) and positions:
            words.append((_readable(current), positions))
            current, positions = "", []
        current += token.removesuffix(WORD_END).removeprefix(WORD_START)
        positions.append(position)
        if token.endswith(WORD_END):
            words.append((_readable(current), positions))
            current, positions = "", []
    if positions:
        words.append((_readable(current), positions))
    return words


def _readable(word: str) -> str:
    return re.sub(r"\s+", " ", word).strip() or "?"


def prompt_words(tokenizer, prompt: str, offset: int = 0) -> list[tuple[str, list[int]]]:
    """:func:`word_groups` of ``prompt`` under ``tokenizer`` (truncated as the text encoder sees it),
    positions shifted by ``offset`` (where the tokenizer's tokens start in the maps' text axis: a
    family's ``map_tokens``, e.g. SD3's T5 tokens after its CLIP tokens)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [(word, [p + offset for p in positions])
            for word, positions in word_groups(tokens, set(tokenizer.all_special_tokens))]


def word_maps(token_maps: torch.Tensor, groups: list[tuple[str, list[int]]]) -> torch.Tensor:
    """``(T, H, W)`` token maps -> ``(W, H, W)``: each word's tokens summed (empty groups: zeros)."""
    if not groups:
        return token_maps.new_zeros((0, *token_maps.shape[-2:]))
    return torch.stack([token_maps[positions].sum(dim=0) for _, positions in groups])


def spatial_distribution(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(..., H, W)`` -> the same maps normalised to sum 1 over the pixels (where each word looks)."""
    total = maps.sum(dim=(-2, -1), keepdim=True)
    return maps / total.clamp_min(eps)
