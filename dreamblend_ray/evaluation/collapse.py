"""Attention collapse, measured: how much a prompt's other words look where the subject is.

A fine-tune that overfits is suspected of making every word of a prompt attend to the subject
(its cross-attention "collapses" onto it), so the other words lose their say over the image. The
probe measures this on a model's own per-token cross-attention maps (the sampler's
``attention_maps``, DDIM+CFG at alpha 0, no VAE decode), without images or any judge model:

- subject words: the identifier token and the class noun's words; other content words: every
  other word of the prompt except :data:`STOP_WORDS` and punctuation.
- subject region: the smallest set of pixels holding half of the subject words' attention mass
  (the spatial distribution of their summed maps), :func:`subject_region`.
- collapse score of a prompt: the mean over the other content words of the share of the word's
  spatial attention mass inside the subject region. In [0, 1]: a uniform map scores the region's
  area share (|region| / N), a map that lies entirely inside the region scores 1, and a map equal
  to the subject's scores the subject's own share (``subject_share``: at least 1/2, since the
  region holds half of the subject's mass by construction, more when its map is peaked; 1 when
  the subject's attention sits on the region alone). Read a word's collapse against that figure.
- entropy of a word's map: its spatial distribution's entropy over log N (0: one pixel, 1:
  uniform); ``entropy_other`` is the mean over other content words, ``entropy_subject`` the
  subject map's, and ``sharpness`` = 1 - entropy_subject.
- two more readings of "collapse onto the subject": ``subject_mass``, the subject words' share of
  the attention the content words get (along the token axis: do they win the softmax?), and
  ``correlation``, the mean spatial correlation of the other words' maps with the subject's (do
  the other words take on the subject's layout?).

:func:`probe_model` averages these over prompts x seeds for one model; :func:`probe_checkpoints`
does it for the base model (adapters disabled) and every saved checkpoint of a subject;
:func:`choose_pair_by_attention` picks a (guidance, edit) pair from the rows (registered as the
``"attention"`` pair-choice scorer, ``--choose-pair attention``); :func:`collapse_plot` draws them.

Probe prompts (:func:`probe_prompts`): DreamBooth templates that put the subject in a scene
("a sks dog in the jungle"), or the prompts a provider registered for the base model's source
(:func:`register_probe_prompts`; ``dreamblend_ray.embedded.scorer`` registers the embedded model's
companion prompts, so nothing here imports the toy world).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from dreamblend_ray.config import SamplingConfig, check_range, to_dict
from dreamblend_ray.evaluation import protocol
from dreamblend_ray.evaluation.pair_choice import PairChoiceOptions, ScorerPlugin, finite, register_scorer, validate_scores
from dreamblend_ray.io import storage
from dreamblend_ray.method.heatmaps import prompt_words, spatial_distribution, word_maps
from dreamblend_ray.method.pair import adapters_disabled, single
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.training import checkpoints, layout

logger = logging.getLogger(__name__)

STOP_WORDS = frozenset({
    "a", "an", "the", "on", "in", "of", "with", "beside", "next", "to", "and", "at", "by", "for", "from",
    "into", "onto", "near", "under", "over", "behind", "around", "its", "it", "is", "top", "front",
    "photo", "picture", "image", "shaped",
})
PROBE_STEPS = 10
PROBE_GUIDANCE_SCALE = 2.0  # the pair choice's default (PairChoiceOptions.guidance_scale)
PROBE_PROMPTS = 4
MEASURES = ("collapse", "entropy_other", "entropy_subject", "sharpness", "subject_share", "subject_mass",
            "correlation")
RULE = ("guidance: latest step with collapse <= base + tolerance * max(0, max_collapse - base); "
        "edit: the latest step; no rise of min_rise above the base: the default pair")
# A rise of the collapse score smaller than this is read as no collapse: on the embedded model the
# checkpoints' scores scatter by about 0.005 around the base's (benchmarks/attention_collapse.py).
MIN_RISE = 0.05


# --------------------------------------------------------------------------- maths on maps

def split_words(groups: list[tuple[str, list[int]]], token: str, class_noun: str
                ) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(subject words, other content words) of a prompt's ``prompt_words`` groups.

    Subject words: the identifier ``token`` and the words of ``class_noun`` (case-insensitive);
    other content words: the rest, without :data:`STOP_WORDS` and words with no letter or digit.
    """
    subject_names = {token.lower(), *class_noun.lower().split()}
    subject, other = [], []
    for word, positions in groups:
        name = word.lower()
        if name in subject_names:
            subject.append((word, positions))
        elif name not in STOP_WORDS and any(ch.isalnum() for ch in name):
            other.append((word, positions))
    return subject, other


def _check_maps(name: str, maps: torch.Tensor, dims: int) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() != dims:
        raise ValueError(f"{name} must be a tensor with {dims} dimensions, got "
                         f"{tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__}")
    if maps.numel() == 0 or not torch.isfinite(maps).all() or (maps < 0).any():
        raise ValueError(f"{name} must be non-empty, finite and non-negative")


def subject_region(subject_map: torch.Tensor, mass: float = 0.5) -> torch.Tensor:
    """``(H, W)`` subject attention -> ``(H, W)`` bool: the fewest pixels holding ``mass`` of it.

    Pixels are taken from the most attended down (ties: lower flat index first) until their share
    of the map's total reaches ``mass``; at least one pixel. An all-zero map is treated as uniform.
    """
    _check_maps("subject_map", subject_map, 2)
    check_range("mass", mass, 0.0, 1.0)
    flat = spatial_distribution(subject_map.double()).flatten()
    if flat.sum() <= 0:
        flat = torch.full_like(flat, 1.0 / flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    cumulative = torch.cumsum(flat[order], dim=0)
    count = int(torch.searchsorted(cumulative, torch.tensor(mass * float(cumulative[-1]), dtype=cumulative.dtype)
                                   - 1e-12)) + 1
    region = torch.zeros_like(flat, dtype=torch.bool)
    region[order[:min(count, flat.numel())]] = True
    return region.reshape(subject_map.shape)


def region_shares(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``(K, H, W)`` maps and an ``(H, W)`` bool region -> ``(K,)``: each map's share of its own
    mass inside the region (0..1; an all-zero map counts as uniform: the region's area share)."""
    _check_maps("maps", maps, 3)
    if region.shape != maps.shape[-2:] or region.dtype != torch.bool:
        raise ValueError(f"region must be a bool tensor of shape {tuple(maps.shape[-2:])}, got "
                         f"{region.dtype} {tuple(region.shape)}")
    dist = spatial_distribution(maps.double())
    empty = dist.sum(dim=(-2, -1)) <= 0
    shares = (dist * region).sum(dim=(-2, -1))
    return torch.where(empty, region.double().mean(), shares)


def normalised_entropy(maps: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` -> ``(...)``: the entropy of each map's spatial distribution over log(H*W),
    in [0, 1] (0: all mass on one pixel; 1: uniform). A single-pixel grid gives 0."""
    pixels = maps.shape[-2] * maps.shape[-1]
    if pixels < 2:
        return maps.new_zeros(maps.shape[:-2], dtype=torch.float64)
    dist = spatial_distribution(maps.double()).flatten(-2)
    uniform = torch.full_like(dist, 1.0 / pixels)
    dist = torch.where(dist.sum(dim=-1, keepdim=True) > 0, dist, uniform)
    terms = torch.where(dist > 0, dist * torch.log(dist.clamp_min(1e-300)), torch.zeros_like(dist))
    return (-terms.sum(dim=-1) / math.log(pixels)).clamp(0.0, 1.0)


def spatial_correlation(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(K, H, W)`` maps and an ``(H, W)`` reference -> ``(K,)`` Pearson correlations over the
    pixels (0 where a map is constant): does a word look where the reference looks?"""
    flat = maps.double().flatten(-2)
    ref = reference.double().flatten()
    flat, ref = flat - flat.mean(dim=-1, keepdim=True), ref - ref.mean()
    norms = flat.norm(dim=-1) * ref.norm()
    return torch.where(norms > 0, (flat @ ref) / norms.clamp_min(1e-300), torch.zeros_like(norms))


def prompt_measures(token_maps: torch.Tensor, groups: list[tuple[str, list[int]]], token: str,
                    class_noun: str) -> dict:
    """The collapse measures of one prompt's ``(T, H, W)`` token maps.

    ``groups``: the prompt's ``prompt_words``. Returns collapse, entropy_other, entropy_subject,
    sharpness, region_area (the subject region's share of the pixels), subject_mass (the subject
    words' share of the attention mass the content words get, over all pixels: collapse along the
    token axis), correlation (the mean spatial correlation of the other words' maps with the
    subject's: collapse of their layout onto the subject's) and ``words``: each other
    content word's share inside the region. ValueError when the prompt names no subject word or no
    other content word.
    """
    _check_maps("token_maps", token_maps, 3)
    subject, other = split_words(groups, token, class_noun)
    words = " ".join(word for word, _ in groups)
    if not subject:
        raise ValueError(f"the prompt {words!r} holds neither the token {token!r} nor the class noun {class_noun!r}")
    if not other:
        raise ValueError(f"the prompt {words!r} has no content word besides the subject's")
    subject_map = word_maps(token_maps, subject).sum(dim=0)
    region = subject_region(subject_map)
    other_maps = word_maps(token_maps, other)
    shares = region_shares(other_maps, region)
    entropy_subject = float(normalised_entropy(subject_map))
    return {"collapse": float(shares.mean()), "entropy_other": float(normalised_entropy(other_maps).mean()),
            "entropy_subject": entropy_subject, "sharpness": 1.0 - entropy_subject,
            "subject_share": float(region_shares(subject_map[None], region)[0]),
            "subject_mass": float(subject_map.sum() / (subject_map.sum() + other_maps.sum()).clamp_min(1e-12)),
            "correlation": float(spatial_correlation(other_maps, subject_map).mean()),
            "region_area": float(region.double().mean()),
            "words": {word: float(share) for (word, _), share in zip(other, shares)}}


# --------------------------------------------------------------------------- probe prompts

# base source (``components.source``) -> provider(instance_images, class_noun, token, num_prompts) -> prompts
ProbePrompts = Callable[[list, str, str, int], list[str]]
PROBE_PROMPT_PROVIDERS: dict[str, ProbePrompts] = {}


def register_probe_prompts(source: str, provider: ProbePrompts) -> ProbePrompts:
    """Probe prompts for the base model whose ``components.source`` is ``source`` (e.g. "embedded").
    Registering the same provider again is a no-op; another one under a taken source is a ValueError."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    if not callable(provider):
        raise ValueError(f"provider must be callable, got {type(provider).__name__}")
    if PROBE_PROMPT_PROVIDERS.get(source, provider) is not provider:
        raise ValueError(f"another probe-prompt provider is already registered for {source!r}")
    PROBE_PROMPT_PROVIDERS[source] = provider
    return provider


def scene_prompts(class_noun: str, token: str, num_prompts: int = PROBE_PROMPTS) -> list[str]:
    """The first ``num_prompts`` DreamBooth object templates that put the subject in a scene
    ("a {token} {class_noun} in the jungle": content words after the subject)."""
    check_range("num_prompts", num_prompts, 1, None, integer=True)
    lead = "a {token} {class_noun} "
    scenes = [t for t in protocol.templates("object") if t.startswith(lead)
              and any(w.lower() not in STOP_WORDS for w in t[len(lead):].split())]
    if num_prompts > len(scenes):
        raise ValueError(f"num_prompts must be at most {len(scenes)} for DreamBooth scene prompts, got {num_prompts}")
    return [protocol.fill(t, class_noun, token) for t in scenes[:num_prompts]]


def probe_prompts(components, instance_images: list, class_noun: str, token: str,
                  num_prompts: int = PROBE_PROMPTS) -> list[str]:
    """The probe's prompts for a subject: its base source's registered provider, else :func:`scene_prompts`."""
    provider = PROBE_PROMPT_PROVIDERS.get(getattr(components, "source", None))
    if provider is None:
        return scene_prompts(class_noun, token, num_prompts)
    return list(provider(list(instance_images), class_noun, token, num_prompts))


# --------------------------------------------------------------------------- probing models

def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def probe_config(steps: int = PROBE_STEPS, guidance_scale: float = PROBE_GUIDANCE_SCALE) -> SamplingConfig:
    """Plain sampling (alpha 0) with heat maps averaged over every step."""
    return SamplingConfig(num_inference_steps=steps, guidance_scale=guidance_scale, alpha=0.0,
                          attention_maps=True, maps_start=0, maps_stop=None)


def probe_model(sampler, pair, prompts: list[str], seeds: list[int], token: str, class_noun: str,
                steps: int = PROBE_STEPS, guidance_scale: float = PROBE_GUIDANCE_SCALE) -> dict:
    """The collapse measures of one model (``pair``, normally G = E) over ``prompts`` x ``seeds``.

    Samples every (prompt, seed) at alpha 0 with ``steps`` DDIM steps without decoding, takes each
    sample's ``(T, H, W)`` token maps (averaged over the selected layers and all steps) and
    :func:`prompt_measures`. Returns {collapse, entropy_other, entropy_subject, sharpness} (means
    over prompts, each prompt's the mean over seeds) and ``per_prompt``: [{prompt, the measures,
    words}] (``words``: each other content word's share, mean over seeds).
    """
    if isinstance(prompts, str) or not prompts or not seeds:
        raise ValueError("prompts and seeds must be non-empty lists")
    batch_prompts = [p for p in prompts for _ in seeds]
    batch_seeds = [int(s) for _ in prompts for s in seeds]
    result = sampler.sample(pair, batch_prompts, batch_seeds, probe_config(steps, guidance_scale), decode=False)
    maps = result.attention_maps["dreamblend"]
    tokenizer, offset = sampler.components.model_family.map_tokens(sampler.components)
    per_prompt = []
    for index, prompt in enumerate(prompts):
        groups = prompt_words(tokenizer, prompt, offset)
        samples = [prompt_measures(maps[index * len(seeds) + j], groups, token, class_noun)
                   for j in range(len(seeds))]
        entry = {"prompt": prompt, **{m: _mean(s[m] for s in samples) for m in MEASURES}}
        entry["words"] = {w: _mean(s["words"][w] for s in samples) for w in samples[0]["words"]}
        per_prompt.append(entry)
    return {**{m: _mean(p[m] for p in per_prompt) for m in MEASURES}, "per_prompt": per_prompt}


def probe_checkpoints(root: str, subject_id: str, components, prompts: list[str], seeds: list[int],
                      steps: int = PROBE_STEPS, guidance_scale: float = PROBE_GUIDANCE_SCALE,
                      checkpoint_steps: list[int] | None = None, progress: bool = False) -> dict:
    """Probe the base model (adapters disabled) and each saved checkpoint of a subject.

    ``checkpoint_steps`` default: every saved step of its manifest. Returns the JSON-ready record
    stored as subject.json's ``attention_probe``: {rows: [{step, collapse, entropy_other,
    entropy_subject, sharpness, per_prompt}], base: {the same without step}, prompts, seeds, steps
    (DDIM steps of the probe), guidance_scale}.
    """
    manifest = layout.read_manifest(root, subject_id)
    token, class_noun = manifest["token"], manifest["class_noun"]
    sampler = DreamBlendSampler(components)

    def measure(pair) -> dict:
        return probe_model(sampler, pair, prompts, seeds, token, class_noun, steps, guidance_scale)

    with adapters_disabled(components.denoiser):
        base = measure(single(components.denoiser))
    rows = []
    for step in tqdm(list(checkpoint_steps or manifest["steps"]), desc="probing checkpoints", disable=not progress):
        pair = checkpoints.load_pair(root, subject_id, components, guidance_step=step, edit_step=step)[0]
        try:
            rows.append({"step": step, **measure(pair)})
        finally:
            checkpoints.unload_pair(pair, components)
        logger.info("subject %s step %d: collapse %.4f (base %.4f), sharpness %.4f", subject_id, step,
                    rows[-1]["collapse"], base["collapse"], rows[-1]["sharpness"])
    return {"rows": rows, "base": base, "prompts": list(prompts), "seeds": [int(s) for s in seeds],
            "steps": int(steps), "guidance_scale": float(guidance_scale)}


# --------------------------------------------------------------------------- choosing the pair

def validate_rows(rows: Iterable[dict]) -> list[dict]:
    """Probe rows sorted by step; ValueError for a missing step or collapse, a bad value or a repeated step."""
    return validate_scores(rows, keys=("collapse",), name="rows")


def _base_collapse(base) -> float:
    if not isinstance(base, dict) or "collapse" not in base:
        raise ValueError("base must be the base model's probe row, a dict with a collapse score")
    return finite("base.collapse", base["collapse"])


def choose_pair_by_attention(rows: list[dict], base: dict, tolerance: float = 0.1, min_rise: float = MIN_RISE,
                             default: tuple[int, int] | None = None) -> dict:
    """Choose (guidance_step, edit_step) from probe rows alone (no images, no judge model).

    E is the latest checkpoint (the most trained: the best likeness the fine-tune reached). G is
    the latest checkpoint whose collapse score is at most ``threshold = base + tolerance *
    max(0, max_collapse - base)``: the scale of the score depends on the model (layers, grid,
    vocabulary), so the allowance is a fraction of the rise this fine-tune actually shows above the
    base model, which has not learnt the subject. When no checkpoint qualifies, G is the
    least-collapsed checkpoint (ties: the earliest) and ``fallback`` is set.

    When the score rises less than ``min_rise`` above the base anywhere, the probe has seen no
    collapse (``collapsed`` False) and a threshold would only read noise: the pair is ``default``
    (the fine-tune's own default pair) when given, else G = E = the latest. Returns a JSON-ready
    dict: guidance_step, edit_step, identical, fallback, collapsed, threshold, base_collapse,
    max_collapse, tolerance, min_rise, rule, rows.
    """
    rows = validate_rows(rows)
    base_score = _base_collapse(base)
    check_range("tolerance", tolerance, 0.0, 1.0)
    check_range("min_rise", min_rise, 0.0, 1.0)
    highest = max(r["collapse"] for r in rows)
    threshold = base_score + tolerance * max(0.0, highest - base_score)
    collapsed = highest - base_score >= min_rise
    qualifying = [r for r in rows if r["collapse"] <= threshold]
    steps = [r["step"] for r in rows]
    if not collapsed:
        guidance_step, edit_step = default if default is not None else (steps[-1], steps[-1])
        logger.info("the probe saw no collapse (rise %.4f < %.4f): pair G=%d, E=%d (%s)", highest - base_score,
                    min_rise, guidance_step, edit_step, "the default pair" if default else "the latest step")
    else:
        edit_step = steps[-1]
        guidance_step = qualifying[-1]["step"] if qualifying else min(rows, key=lambda r: (r["collapse"], r["step"]))["step"]
        if not qualifying:
            logger.warning("no checkpoint keeps collapse <= %.4f (base %.4f); guidance falls back to the "
                           "least collapsed step %d", threshold, base_score, guidance_step)
    return {"guidance_step": guidance_step, "edit_step": edit_step,
            "identical": guidance_step == edit_step, "fallback": collapsed and not qualifying,
            "collapsed": collapsed, "threshold": threshold, "base_collapse": base_score, "max_collapse": highest,
            "tolerance": float(tolerance), "min_rise": float(min_rise), "rule": RULE, "rows": rows}


# --------------------------------------------------------------------------- plot

COLLAPSE_COLOUR = (31, 119, 180)
SHARPNESS_COLOUR = (255, 127, 14)
BASE_COLOUR = (110, 110, 110)


def _dashed(draw: ImageDraw.ImageDraw, y: float, x0: float, x1: float, colour, dash: int = 6) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=colour, width=1)
        x += 2 * dash


def collapse_plot(rows: list[dict], base: dict, size: tuple[int, int] = (640, 400)) -> Image.Image:
    """A line chart (PIL only) of the collapse score and the subject map's sharpness against the
    fine-tuning step, with the base model's values as dashed lines. Both are in [0, 1], so the
    y axis is fixed to [0, 1]. Returns an RGB image of ``size``."""
    rows = validate_rows(rows)
    base_score = _base_collapse(base)
    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"size must be at least 200x150 pixels, got {size}")
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, width - 16, 34, height - 60
    steps = [r["step"] for r in rows]
    lo, hi = min(0, steps[0]), max(steps[-1], 1)

    def x_of(step: float) -> float:
        return left + (step - lo) / (hi - lo) * (right - left)

    def y_of(value: float) -> float:
        return bottom - min(max(value, 0.0), 1.0) * (bottom - top)

    draw.text((left, 10), "attention collapse vs fine-tuning step", fill="black", font=font)
    for k in range(6):  # y grid and ticks
        value = k / 5
        draw.line([(left, y_of(value)), (right, y_of(value))], fill=(230, 230, 230))
        draw.text((left - 30, y_of(value) - 6), f"{value:.1f}", fill="black", font=font)
    ticks = steps if len(steps) <= 8 else steps[:: math.ceil(len(steps) / 8)] + [steps[-1]]
    for step in sorted(set(ticks) | {lo}):
        draw.line([(x_of(step), bottom), (x_of(step), bottom + 4)], fill="black")
        draw.text((x_of(step) - 8, bottom + 6), str(step), fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    draw.text(((left + right) // 2 - 12, bottom + 20), "step", fill="black", font=font)
    draw.text((6, top - 18), "score", fill="black", font=font)

    series = [("collapse", COLLAPSE_COLOUR, base_score)]
    if all(isinstance(r.get("sharpness"), (int, float)) for r in rows):
        sharp_base = base.get("sharpness")
        series.append(("sharpness", SHARPNESS_COLOUR,
                       float(sharp_base) if isinstance(sharp_base, (int, float)) else None))
    for key, colour, base_value in series:
        if base_value is not None:
            _dashed(draw, y_of(base_value), left, right, colour)
        points = [(x_of(r["step"]), y_of(float(r[key]))) for r in rows]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend_y = height - 22
    labels = [(f"{key} (dashed: base model)", colour) for key, colour, _ in series]
    x = left
    for text, colour in labels:
        draw.line([(x, legend_y + 6), (x + 18, legend_y + 6)], fill=colour, width=2)
        draw.text((x + 22, legend_y), text, fill="black", font=font)
        x += 28 + int(draw.textlength(text, font=font))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- the fine-tuning job's hooks

@dataclass(frozen=True)
class ProbeOptions:
    """The probe the fine-tuning job runs per subject (``--attention-probe``, ``--choose-pair attention``).

    ``num_prompts`` probe prompts (:func:`probe_prompts`) x ``seeds``, ``steps`` DDIM steps at
    ``guidance_scale``, maps averaged over every step.
    """

    num_prompts: int = PROBE_PROMPTS
    seeds: tuple[int, ...] = (0, 1)
    steps: int = PROBE_STEPS
    guidance_scale: float = PROBE_GUIDANCE_SCALE

    def __post_init__(self):
        check_range("num_prompts", self.num_prompts, 1, 25, integer=True)
        if isinstance(self.seeds, (str, bytes)) or not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        for seed in self.seeds:
            check_range("seeds", seed, 0, 2**32 - 1, integer=True)
        object.__setattr__(self, "seeds", tuple(self.seeds))
        check_range("steps", self.steps, 1, 1000, integer=True)
        check_range("guidance_scale", self.guidance_scale, 0.0, 50.0)

    @classmethod
    def of_pair_choice(cls, options: PairChoiceOptions) -> "ProbeOptions":
        """The probe of ``--choose-pair attention``: the choice's prompts count and seeds."""
        return cls(num_prompts=options.num_prompts, seeds=options.seeds)

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeOptions":
        return cls(**data)


def probe_is_current(manifest: dict, options: ProbeOptions) -> bool:
    """Whether subject.json holds a probe of every saved step under ``options``' settings."""
    probe = manifest.get("attention_probe")
    return (isinstance(probe, dict) and [r.get("step") for r in probe.get("rows", [])] == manifest["steps"]
            and probe.get("seeds") == list(options.seeds) and probe.get("steps") == options.steps
            and probe.get("guidance_scale") == options.guidance_scale
            and len(probe.get("prompts", [])) == options.num_prompts)


def record_probe(root: str, subject_id: str, components, instance_images: list, options: ProbeOptions,
                 progress: bool = False) -> dict:
    """Probe a fine-tuned subject, store the record as subject.json's ``attention_probe`` (rewritten
    atomically) and its plot as ``subjects/{id}/collapse.png``; returns the manifest."""
    manifest = layout.read_manifest(root, subject_id)
    prompts = probe_prompts(components, instance_images, manifest["class_noun"], manifest["token"],
                            options.num_prompts)
    probe = probe_checkpoints(root, subject_id, components, prompts, list(options.seeds), options.steps,
                              options.guidance_scale, progress=progress)
    storage.write_bytes(layout.collapse_plot_uri(root, subject_id),
                        png_bytes(collapse_plot(probe["rows"], probe["base"])))
    manifest = {**layout.read_manifest(root, subject_id), "attention_probe": probe}
    layout.write_manifest(root, subject_id, manifest)
    return manifest


def choose_and_record_by_attention(root: str, subject_id: str, components, instance_images: list,
                                   class_noun: str, token: str, options: PairChoiceOptions,
                                   progress: bool = False) -> dict:
    """The ``"attention"`` pair-choice scorer's hook (``auto_choose_pair``): probe the subject
    unless subject.json already holds a current probe, choose with :func:`choose_pair_by_attention`
    at ``options.tolerance`` and record the pair (``guidance_step``, ``edit_step`` and a
    ``pair_choice`` entry with ``scorer: "attention"``); returns the rewritten manifest."""
    probe_options = ProbeOptions.of_pair_choice(options)
    manifest = layout.read_manifest(root, subject_id)
    if not probe_is_current(manifest, probe_options):
        manifest = record_probe(root, subject_id, components, instance_images, probe_options, progress)
    probe = manifest["attention_probe"]
    default = (manifest["guidance_step"], manifest["edit_step"])  # the fine-tune's own pair
    choice = choose_pair_by_attention(probe["rows"], probe["base"], options.tolerance, default=default)
    choice["rows"] = [{k: v for k, v in r.items() if k != "per_prompt"} for r in choice["rows"]]
    choice.update(scorer="attention", prompts=probe["prompts"], seeds=probe["seeds"], options=to_dict(options))
    manifest = {**manifest, "guidance_step": choice["guidance_step"], "edit_step": choice["edit_step"],
                "pair_choice": choice}
    layout.write_manifest(root, subject_id, manifest)
    logger.info("subject %s: attention pair G=%d, E=%d (threshold %.4f)", subject_id, choice["guidance_step"],
                choice["edit_step"], choice["threshold"])
    return manifest


PLUGIN = register_scorer("attention", ScorerPlugin(choose=choose_and_record_by_attention))
