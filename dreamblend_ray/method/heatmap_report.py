"""Per-word attention heat maps of one sample, as arrays, JSON and a labelled grid PNG.

Rows G / E / DreamBlend (``ROWS``), columns the image then one per word of the prompt, as DAAM
draws them. A column's maps share one colour scale (that word's range over the three rows), so a
word that looks elsewhere, or more diffusely, in one row reads so against the others.

Python API::

    reports = attention_reports(sampler, pair, ["a sks dog beside a ball"], [0], config)
    reports[0].grid().save("grid.png"); json.dump(reports[0].to_json(), f)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dreamblend_ray.method.heatmaps import prompt_words, word_maps

ROWS = ("guidance", "edit", "dreamblend")
ROW_LABELS = {"guidance": "G", "edit": "E", "dreamblend": "DreamBlend"}
# A perceptually ordered ramp (dark blue -> teal -> yellow), interpolated: no plotting library needed.
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


@dataclass
class AttentionReport:
    """One sample's heat maps. ``maps[row]``: ``(W, H, W')`` float32, word w's attention (its tokens
    summed) averaged over the selected layers and the map steps; ``images[row]``: that trajectory's
    image; ``distance``: the E-to-G attention distance per measured step."""

    prompt: str
    seed: int
    words: list[str]
    maps: dict[str, np.ndarray]
    images: dict[str, Image.Image]
    distance: list[float]

    def grid(self, cell: int = 96) -> Image.Image:
        return render_grid(self, cell)

    def to_json(self) -> dict:
        """JSON-ready: words, maps as nested lists (rounded to 1e-5), the distance curve."""
        return {"prompt": self.prompt, "seed": self.seed, "words": list(self.words),
                "rows": list(ROWS), "maps": {row: np.round(self.maps[row], 5).tolist() for row in ROWS},
                "map_size": list(self.maps[ROWS[0]].shape[1:]),
                "attention_distance_steps": [float(d) for d in self.distance]}

    @classmethod
    def from_json(cls, data: dict, images: dict[str, Image.Image], prompt: str = "",
                  seed: int = 0) -> "AttentionReport":
        """Back from :meth:`to_json` (or the HTTP API's ``attention`` entry, which has no prompt or
        seed: give them); ``images``: each row's image (the JSON holds none). A null distance is NaN."""
        missing = [row for row in ROWS if row not in data.get("maps", {}) or row not in images]
        if missing or "words" not in data:
            raise ValueError(f"an attention report needs words, and maps and images of {list(ROWS)}; missing {missing}")
        maps = {row: np.asarray(data["maps"][row], np.float32).reshape(len(data["words"]), *data["map_size"])
                for row in ROWS}
        distance = [float("nan") if d is None else float(d) for d in data.get("attention_distance_steps", [])]
        return cls(data.get("prompt", prompt), int(data.get("seed", seed)), list(data["words"]), maps,
                   {row: images[row] for row in ROWS}, distance)


def reports_from(result, prompts: list[str], seeds: list[int], tokenizer, offset: int = 0) -> list[AttentionReport]:
    """The per-sample reports of a ``SampleResult`` made with ``config.attention_maps``; ``tokenizer``
    and ``offset``: the base family's ``map_tokens`` (the tokens the maps' text axis holds)."""
    if result.attention_maps is None:
        raise ValueError("the result holds no attention maps: sample with SamplingConfig(attention_maps=True)")
    images = {"guidance": result.reference_images, "edit": result.edit_images, "dreamblend": result.images}
    reports = []
    for b, (prompt, seed) in enumerate(zip(prompts, seeds)):
        groups = prompt_words(tokenizer, prompt, offset)
        maps = {row: word_maps(result.attention_maps[row][b], groups).numpy().astype(np.float32) for row in ROWS}
        distance = result.attention_distance[b].tolist() if result.attention_distance.numel() else []
        reports.append(AttentionReport(prompt, seed, [w for w, _ in groups], maps,
                                       {row: images[row][b] for row in ROWS}, distance))
    return reports


def attention_reports(sampler, pair, prompts: list[str], seeds: list[int], config,
                      negative_prompts: list[str] | None = None) -> list[AttentionReport]:
    """Sample ``prompts`` x ``seeds`` once with heat maps on; one report per sample."""
    config = dataclasses.replace(config, attention_maps=True)
    result = sampler.sample(pair, list(prompts), list(seeds), config, negative_prompts=negative_prompts,
                            track_distance=True)
    components = sampler.components
    return reports_from(result, list(prompts), list(seeds), *components.model_family.map_tokens(components))


# --------------------------------------------------------------------------- drawing


def colorize(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 through :data:`RAMP`."""
    position = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(RAMP) - 2)
    frac = (position - low)[..., None]
    return (RAMP[low] * (1 - frac) + RAMP[low + 1] * frac).round().astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, cell: int, weight: float = 0.6) -> Image.Image:
    """The heat map (already in [0, 1]) over a grey copy of the image, both ``cell`` px square."""
    base = image.convert("L").convert("RGB").resize((cell, cell), Image.NEAREST)
    colour = Image.fromarray(colorize(heat)).resize((cell, cell), Image.BILINEAR)
    return Image.blend(base, colour, weight)


def column_scales(report: AttentionReport) -> tuple[np.ndarray, np.ndarray]:
    """``(W,)`` lows and spans: each word's smallest value and range over the three rows (its
    column's shared colour scale)."""
    stacked = np.stack([report.maps[row] for row in ROWS])  # (rows, W, H, W')
    if stacked.shape[1] == 0:
        return np.zeros(0, np.float32), np.ones(0, np.float32)
    low = stacked.min(axis=(0, 2, 3))
    return low, np.maximum(stacked.max(axis=(0, 2, 3)) - low, 1e-12)


def render_grid(report: AttentionReport, cell: int = 96) -> Image.Image:
    """Rows G / E / DreamBlend; columns the image, then one heat map per word (labelled)."""
    label_w, header_h, pad = 84, 22, 2
    columns = 1 + len(report.words)
    grid = Image.new("RGB", (label_w + columns * (cell + pad), header_h + len(ROWS) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(["image", *report.words]):
        draw.text((label_w + j * (cell + pad) + 3, 5), title[: max(4, cell // 7)], fill="black")
    lows, spans = column_scales(report)
    for i, row in enumerate(ROWS):
        top = header_h + i * (cell + pad)
        draw.text((4, top + cell // 2 - 6), ROW_LABELS[row], fill="black")
        image = report.images[row]
        grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w, top))
        for j in range(len(report.words)):
            heat = (report.maps[row][j] - lows[j]) / spans[j]
            grid.paste(overlay(image, heat, cell), (label_w + (j + 1) * (cell + pad), top))
    return grid
