"""Exact, analytic metrics of shapes-world images (no learned judge; deterministic).

Reading an image (:func:`read_image`):

- background: the most common palette colour (nearest palette entry) of the border pixels;
- object mask: pixels whose distance from the measured background colour (the per-channel median
  of the border pixels, so that an off-palette background does not swallow the object) exceeds
  half the distance from it to the object's colour (the anti-aliasing midpoint), largest
  8-connected component only (stray pixels are ignored);
- box: the mask's bounding box; every world shape touches all four sides of its box;
- shape: the shape whose template, rendered into the measured box, has the highest IoU with the
  mask (candidates: every shape of the world, the subject shapes included);
- object colour: the palette colour nearest to the per-channel median of the mask's pixels;
  ``colours``: the fraction of mask pixels nearest to each palette colour (for patterns),
  counting only pixels close to a palette colour (anti-aliased edge mixtures are left out).

:func:`read_objects` reads every object of an image the same way: each blob of pixels far from
the background, refined with its own colour's midpoint threshold (images of two objects).

Metrics built on it:

- :func:`prompt_fidelity`: per attribute the prompt asks for (background colour, object shape,
  object colour), the fraction of images where the reading matches; ``overall`` averages over
  all asked attributes, ``all_correct`` counts images with every asked attribute right. A prompt
  that names several objects ("a sks shape and a red circle") is scored against every object
  read: each named world shape must be there, in its named colour; :func:`context_fidelity` picks
  the part of it that a subject prompt's new context asks for.
- :func:`subject_fidelity`: agreement of the object with a subject's instance images, compared
  in the object's own box (so position and size do not matter): mask IoU (shape), the fraction of
  overlapping pixels of the same palette colour (pattern) and 1 - total variation between the
  palette histograms (colours); the score is their mean for the image's object that agrees best,
  0 when no object is found.
- :func:`diversity`: the spread of object position and size across images (seeds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from dreamblend_ray.embedded import world

PALETTE_ARRAY = np.array([world.PALETTE[c] for c in world.COLOURS], dtype=np.float32)
MIN_AREA = 12
MAX_AREA_FRACTION = 0.6  # the largest world object covers under half the image
MIN_SHAPE_IOU = 0.4
GRID = 16
PURE_DISTANCE = 70.0
ATTRIBUTES = ("background", "shape", "colour")


@dataclass(frozen=True)
class Reading:
    """What the analysis sees in one image; object fields are None when no object is found."""

    background: str
    colour: str | None = None
    shape: str | None = None
    shape_iou: float = 0.0
    box: tuple[float, float, float, float] | None = None  # cx, cy, width, height in pixels
    area: int = 0
    colours: dict[str, float] = field(default_factory=dict)

    @property
    def has_object(self) -> bool:
        return self.box is not None


def to_array(image) -> np.ndarray:
    """A PIL image or (H, W, 3) array as float32 RGB in [0, 255]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {array.shape}")
    return array


def nearest_colour_index(pixels: np.ndarray) -> np.ndarray:
    """Palette index of the nearest palette colour for pixels (..., 3)."""
    distances = ((pixels[..., None, :] - PALETTE_ARRAY) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


def palette_histogram(pixels: np.ndarray) -> np.ndarray:
    """Fraction of ``pixels`` (N, 3) nearest to each palette colour, over the pixels within
    PURE_DISTANCE of a palette colour (anti-aliased mixtures are left out; all if none is)."""
    index = nearest_colour_index(pixels)
    distance = np.sqrt(((pixels - PALETTE_ARRAY[index]) ** 2).sum(axis=-1))
    pure = distance < PURE_DISTANCE
    counts = np.bincount(index[pure] if pure.any() else index, minlength=len(world.COLOURS))
    return counts / counts.sum()


def border_pixels(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def border_background(array: np.ndarray) -> str:
    counts = np.bincount(nearest_colour_index(border_pixels(array)), minlength=len(world.COLOURS))
    return world.COLOURS[int(counts.argmax())]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, largest first (ties: the first found)."""
    labels = np.zeros(mask.shape, dtype=int)
    sizes = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        labels[start] = len(sizes) + 1
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = labels[start]
                        queue.append((ny, nx))
        sizes.append(size)
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return [labels == i + 1 for i in order]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (ties: the first found)."""
    found = components(mask)
    return found[0] if found else np.zeros_like(mask)


def object_mask(array: np.ndarray) -> np.ndarray:
    """Pixels past the midpoint between the measured background colour and the object's colour,
    largest blob. On clean renders the measured colour is the palette colour exactly."""
    bg = np.median(border_pixels(array), axis=0)
    distance = np.sqrt(((array - bg) ** 2).sum(axis=-1))
    rough = distance > 40
    if rough.sum() < MIN_AREA:
        return np.zeros(distance.shape, dtype=bool)
    return largest_component(_midpoint_mask(array, distance, bg, rough))


def _midpoint_mask(array, distance, bg, region) -> np.ndarray:
    """Pixels of ``region`` past the midpoint between ``bg`` and the region's palette colour."""
    colour = PALETTE_ARRAY[nearest_colour_index(np.median(array[region], axis=0))]
    threshold = 0.5 * float(np.sqrt(((colour - bg) ** 2).sum()))
    return distance > min(max(threshold, 40.0), 120.0)


def object_masks(array: np.ndarray) -> list[np.ndarray]:
    """Every plausible object (several per image): each blob of pixels far from the measured
    background, refined with its own colour's midpoint threshold; largest first."""
    bg = np.median(border_pixels(array), axis=0)
    distance = np.sqrt(((array - bg) ** 2).sum(axis=-1))
    masks = []
    for blob in components(distance > 40):
        if blob.sum() < MIN_AREA:
            break
        refined = largest_component(_midpoint_mask(array, distance, bg, blob) & blob)
        if plausible(refined):
            masks.append(refined)
    return sorted(masks, key=lambda mask: -int(mask.sum()))


def plausible(mask: np.ndarray) -> bool:
    """Whether a mask can be a world object (not a speck, not a frame-filling blob of noise)."""
    return MIN_AREA <= mask.sum() <= MAX_AREA_FRACTION * mask.size


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, float(x1 - x0), float(y1 - y0)


def template(shape: str, box: tuple[float, float, float, float], shape_hw: tuple[int, int]) -> np.ndarray:
    """``shape`` rendered into ``box`` (cx, cy, w, h) as a boolean pixel mask (coverage >= 0.5)."""
    cx, cy, w, h = box
    s = world.SUPERSAMPLE
    ys = (np.arange(shape_hw[0] * s) + 0.5) / s
    xs = (np.arange(shape_hw[1] * s) + 0.5) / s
    x, y = np.meshgrid(xs, ys)
    inside = world.shape_mask(shape, (x - cx) / (w / 2), (y - cy) / (h / 2))
    coverage = inside.reshape(shape_hw[0], s, shape_hw[1], s).mean(axis=(1, 3))
    return coverage >= 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def classify_shape(mask: np.ndarray, box, shapes=world.SHAPES) -> tuple[str | None, float]:
    scores = {shape: iou(mask, template(shape, box, mask.shape)) for shape in shapes}
    shape = max(scores, key=scores.get)
    return (shape if scores[shape] >= MIN_SHAPE_IOU else None), scores[shape]


def read_image(image, shapes=world.SHAPES) -> Reading:
    """Analyse one image (PIL or array) as one object; see the module docstring."""
    array = to_array(image)
    background = border_background(array)
    mask = object_mask(array)
    if not plausible(mask):
        return Reading(background)
    return _read_object(array, mask, background, shapes)


def read_objects(image, shapes=world.SHAPES) -> list[Reading]:
    """Every object of an image (:func:`object_masks`), largest first; [] when none is found."""
    array = to_array(image)
    background = border_background(array)
    return [_read_object(array, mask, background, shapes) for mask in object_masks(array)]


def _read_object(array, mask, background, shapes) -> Reading:
    box = mask_box(mask)
    shape, score = classify_shape(mask, box, shapes)
    pixels = array[mask]
    colour = world.COLOURS[int(nearest_colour_index(np.median(pixels, axis=0)))]
    colours = {name: float(f) for name, f in zip(world.COLOURS, palette_histogram(pixels)) if f}
    return Reading(background, colour, shape, score, box, int(mask.sum()), colours)


# --------------------------------------------------------------------------- prompt fidelity


@dataclass(frozen=True)
class PromptSpec:
    """The attributes a prompt asks for (None: not asked). ``shape``/``colour`` are the first
    named world shape's; ``objects`` lists every noun phrase as (shape or generic noun, colour)."""

    background: str | None = None
    shape: str | None = None
    colour: str | None = None
    objects: tuple[tuple[str, str | None], ...] = ()

    def asked(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES if getattr(self, name)}

    @property
    def named_objects(self) -> list[tuple[str, str | None]]:
        """The noun phrases with a world shape (not the generic noun of a subject prompt)."""
        return [(shape, colour) for shape, colour in self.objects if shape in world.SHAPES]


def parse_prompt(prompt: str) -> PromptSpec:
    """Read the background colour (``<colour> background``), every noun (a shape word or the
    generic ``shape``) with the colour word right before it (or before the ``sks``/pattern words
    that precede it); ``shape``/``colour`` are the first shape word's."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    background = None
    for i, word in enumerate(words[1:], start=1):
        if word == "background" and words[i - 1] in world.PALETTE:
            background = words[i - 1]
    objects = []
    for i, word in enumerate(words):
        if word in world.SHAPES or word in world.GENERIC_NOUNS:
            j = i - 1
            while j >= 0 and words[j] in world.SUBJECT_WORDS and words[j] != "and":
                j -= 1
            named = j >= 0 and words[j] in world.PALETTE and not (j + 1 < len(words) and words[j + 1] == "background")
            objects.append((word, words[j] if named else None))
    shape, colour = next(((s, c) for s, c in objects if s in world.SHAPES), (None, None))
    return PromptSpec(background, shape, colour, tuple(objects))


def score_prompt(image, prompt: str | PromptSpec) -> dict[str, bool]:
    """Per asked attribute, whether the image matches it.

    A prompt with one noun reads the image as one object. A prompt with several nouns (``"a sks
    shape and a red circle"``) reads every object in the image: ``shape`` holds when each named
    world shape is among them, ``colour`` when each is there in its named colour (the generic
    noun of a subject is left to subject fidelity)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if len(spec.objects) < 2:
        reading = read_image(image)
        return {name: getattr(reading, name) == wanted for name, wanted in spec.asked().items()}
    readings = read_objects(image)
    found = [(r.shape, r.colour) for r in readings]
    scores = {"background": border_background(to_array(image)) == spec.background} if spec.background else {}
    named = spec.named_objects
    if named:
        scores["shape"] = all(any(s == shape for s, _ in found) for shape, _ in named)
    if any(colour for _, colour in named):
        scores["colour"] = all((shape, colour) in found for shape, colour in named if colour)
    return scores


def prompt_fidelity(images, prompts) -> dict:
    """Accuracy per attribute, ``overall`` (all asked attributes pooled), ``all_correct``, ``n``."""
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have equal lengths, got {len(images)} and {len(prompts)}")
    if not images:
        raise ValueError("prompt_fidelity needs at least one image")
    per_image = [score_prompt(image, prompt) for image, prompt in zip(images, prompts)]
    result = {}
    for name in ATTRIBUTES:
        hits = [scores[name] for scores in per_image if name in scores]
        result[name] = float(np.mean(hits)) if hits else None
    pooled = [hit for scores in per_image for hit in scores.values()]
    result["overall"] = float(np.mean(pooled)) if pooled else None
    result["all_correct"] = float(np.mean([all(scores.values()) for scores in per_image]))
    result["n"] = len(images)
    return result


def context_fidelity(fidelity: dict) -> float:
    """From a :func:`prompt_fidelity` result, the share of a subject prompt's *new context* drawn
    right: the second object's shape and colour when the prompt names one (its background is the
    subject's own, which every checkpoint draws), else the background colour."""
    if fidelity.get("shape") is not None:
        parts = [fidelity["shape"]] + ([fidelity["colour"]] if fidelity.get("colour") is not None else [])
        return float(np.mean(parts))
    if fidelity.get("background") is None:
        raise ValueError("the prompts ask for no context (no second object, no background)")
    return fidelity["background"]


# --------------------------------------------------------------------------- subject fidelity


@dataclass(frozen=True)
class ObjectCrop:
    """The object resampled on a GRID x GRID lattice of its own box: mask and palette indices."""

    mask: np.ndarray
    colour_index: np.ndarray
    histogram: np.ndarray


def object_crop(image) -> ObjectCrop | None:
    array = to_array(image)
    mask = object_mask(array)
    if not plausible(mask):
        return None
    return _crop(array, mask)


def object_crops(image) -> list[ObjectCrop]:
    """A crop of every object in the image (:func:`object_masks`)."""
    array = to_array(image)
    return [_crop(array, mask) for mask in object_masks(array)]


def _crop(array: np.ndarray, mask: np.ndarray) -> ObjectCrop:
    cx, cy, w, h = mask_box(mask)
    offsets = (np.arange(GRID) + 0.5) / GRID - 0.5
    xs = np.clip(np.floor(cx + offsets * w).astype(int), 0, array.shape[1] - 1)
    ys = np.clip(np.floor(cy + offsets * h).astype(int), 0, array.shape[0] - 1)
    crop_mask = mask[np.ix_(ys, xs)]
    index = nearest_colour_index(array[np.ix_(ys, xs)])
    return ObjectCrop(crop_mask, index, palette_histogram(array[mask]))


def compare_crops(generated: ObjectCrop, reference: ObjectCrop) -> dict[str, float]:
    both = generated.mask & reference.mask
    pattern = float((generated.colour_index[both] == reference.colour_index[both]).mean()) if both.any() else 0.0
    colours = 1.0 - 0.5 * float(np.abs(generated.histogram - reference.histogram).sum())
    return {"shape": iou(generated.mask, reference.mask), "pattern": pattern, "colours": colours}


def subject_scores(image, references: list[ObjectCrop]) -> dict[str, float]:
    """Shape, pattern and colour agreement with the references (mean over them), and their mean,
    of the image's object that agrees best (an image may hold the subject beside other objects)."""
    best = {"shape": 0.0, "pattern": 0.0, "colours": 0.0, "score": 0.0}
    for crop in object_crops(image) if references else []:
        parts = [compare_crops(crop, reference) for reference in references]
        scores = {name: float(np.mean([p[name] for p in parts])) for name in ("shape", "pattern", "colours")}
        scores["score"] = float(np.mean(list(scores.values())))
        best = max(best, scores, key=lambda s: s["score"])
    return best


def subject_scores_per_image(images, instance_images) -> list[dict[str, float]]:
    """:func:`subject_scores` of every image against a subject's ``instance_images``."""
    if not images:
        raise ValueError("subject_fidelity needs at least one image")
    references = [crop for crop in map(object_crop, instance_images) if crop is not None]
    if not references:
        raise ValueError("no object found in the instance images")
    return [subject_scores(image, references) for image in images]


def subject_fidelity(images, instance_images) -> dict:
    """Mean subject agreement of ``images`` with a subject's ``instance_images`` (see module doc)."""
    per_image = subject_scores_per_image(images, instance_images)
    return {name: float(np.mean([s[name] for s in per_image])) for name in per_image[0]} | {"n": len(images)}


def context_verdicts(image, prompt: str) -> list[bool]:
    """Whether ``image`` draws each part of the new context a subject prompt asks for: its second
    object's shape and colour when it names one, else its background (cf. :func:`context_fidelity`)."""
    scores = score_prompt(image, prompt)
    asked = [name for name in ("shape", "colour") if name in scores] or ["background"]
    if not all(name in scores for name in asked):
        raise ValueError(f"the prompt asks for no context (no second object, no background): {prompt!r}")
    return [scores[name] for name in asked]


def context_score(image, prompt: str) -> float:
    """One image's share of the new context drawn right (0, 0.5 or 1 with a second object):
    :func:`context_fidelity` of that image alone."""
    return float(np.mean(context_verdicts(image, prompt)))


def context_right(image, prompt: str) -> bool:
    """Whether ``image`` draws all of the new context its subject prompt asks for."""
    return all(context_verdicts(image, prompt))


def subject_fidelity_by_context(images, prompts, instance_images) -> dict:
    """Subject fidelity split by whether the image drew the prompt's new context.

    Returns ``score`` (the mean over all images, as :func:`subject_fidelity`), ``context_right``
    (share of images), ``when_right`` and ``when_wrong`` (mean subject score of each group; None
    for an empty group). It shows whether likeness and context conflict within one model's own
    samples: a sampler that steers that model must then draw the subject better than the model
    itself does in the images that keep the context.
    """
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have equal lengths, got {len(images)} and {len(prompts)}")
    right = np.array([context_right(image, prompt) for image, prompt in zip(images, prompts)])
    scores = np.array([s["score"] for s in subject_scores_per_image(images, instance_images)])

    def mean(selected):
        return float(scores[selected].mean()) if selected.any() else None

    return {"score": float(scores.mean()), "context_right": float(right.mean()),
            "when_right": mean(right), "when_wrong": mean(~right)}


# --------------------------------------------------------------------------- diversity


def diversity(images) -> dict:
    """Spread of the object's box across images: standard deviations of the centre (x, y, pooled)
    and of the size (mean of width and height), in units of the image side; ``score`` is the
    root of the summed variances. Images without an object are counted in ``missing``."""
    boxes, missing, side = [], 0, None
    for image in images:
        array = to_array(image)
        side = array.shape[1]
        mask = object_mask(array)
        if not plausible(mask):
            missing += 1
            continue
        cx, cy, w, h = mask_box(mask)
        boxes.append((cx, cy, (w + h) / 2))
    if len(boxes) < 2:
        return {"position": 0.0, "size": 0.0, "score": 0.0, "missing": missing, "n": len(images)}
    values = np.array(boxes) / side
    var = values.var(axis=0)
    return {"position": float(np.sqrt((var[0] + var[1]) / 2)), "size": float(np.sqrt(var[2])),
            "score": float(np.sqrt(var.sum())), "missing": missing, "n": len(images)}
