"""The shapes world: 32x32 RGB images of one flat object on a plain background, with captions.

An object is a shape (from :data:`SHAPES`, or one of the subject-only shapes), drawn in a colour
(or a two-colour pattern) from a small palette, scaled to fill a square bounding box of side
``size`` pixels centred at ``(cx, cy)``. Every shape touches all four sides of its box, so the
box measured on an image gives the position and size back exactly (see ``metrics``).

Captions come from a small grammar, e.g. ``"a red circle on a blue background"``. The base model
sees only the base shapes and solid colours; the words the demo subjects need (``sks``, ``star``,
``striped``...) are in the vocabulary but never in a base caption.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 12, 22
MARGIN = 1
PAIR_SIZE = (10.0, 14.0)  # two objects per image: smaller, so that both fit side by side
GAP = 2.0

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS = tuple(PALETTE)
BASE_SHAPES = ("circle", "square", "triangle", "cross")
SUBJECT_SHAPES = ("star", "heart", "ring")
SHAPES = BASE_SHAPES + SUBJECT_SHAPES
PATTERNS = ("solid", "striped", "checkered", "half")
GENERIC_NOUNS = ("shape",)
SUBJECT_WORDS = ("sks", "striped", "checkered", "half", "and")
FILLER_WORDS = ("a", "an", "the", "on", "in", "with", "of", "photo", "picture", "background")
MAX_TOKENS = 16


def vocabulary() -> list[str]:
    """Every word of the world; each becomes one token of the tokenizer."""
    words = FILLER_WORDS + COLOURS + SHAPES + GENERIC_NOUNS + SUBJECT_WORDS
    return list(dict.fromkeys(words))


def build_world_tokenizer():
    """A CLIP tokenizer in which every word of :func:`vocabulary` is exactly one token."""
    from dreamblend_ray.models.tokenizers import build_tokenizer

    return build_tokenizer(tokenizer_word_order(), MAX_TOKENS)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lower-case word, given merge ranks."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


@lru_cache(maxsize=None)
def tokenizer_word_order() -> tuple[str, ...]:
    """An order of :func:`vocabulary` for ``build_tokenizer`` that keeps every word whole.

    Word-level BPE merges can clash (the ``"tr"`` of *triangle* splits *striped*), so words
    that split are moved to the front until none does; ValueError if no order is found.
    """
    from dreamblend_ray.models.tokenizers import word_bpe

    words = vocabulary()
    order = sorted(words, key=lambda word: (-len(word), word))
    for _ in range(len(words)):
        _, merges = word_bpe(order)
        ranks = {merge: rank for rank, merge in enumerate(merges)}
        split = [word for word in words if len(_bpe(word, ranks)) != 1]
        if not split:
            return tuple(order)
        order = split + [word for word in order if word not in split]
    raise ValueError(f"no merge order keeps the words {split} whole")


# --------------------------------------------------------------------------- shapes


def _polygon_inside(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for arrays of points ``(u, v)``; vertices ``(N, 2)``."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


@lru_cache(maxsize=None)
def _star_vertices() -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return _fit_box(points)


def _fit_box(points: np.ndarray) -> np.ndarray:
    """Scale and shift points so they span exactly [-1, 1] on both axes."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - low) / (high - low) * 2 - 1


def _heart_raw(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    y = -y  # image rows grow downwards
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


@lru_cache(maxsize=None)
def _heart_box() -> tuple[float, float, float, float]:
    grid = np.linspace(-1.6, 1.6, 3201)
    x, y = np.meshgrid(grid, grid)
    inside = _heart_raw(x, y)
    return float(x[inside].min()), float(x[inside].max()), float(y[inside].min()), float(y[inside].max())


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit-box coordinates ``(u, v)`` in [-1, 1]^2 (v downwards) lie inside ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "triangle":
        return (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":
        arm = 1 / 3
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1))
    if shape == "star":
        return _polygon_inside(u, v, _star_vertices())
    if shape == "heart":
        x0, x1, y0, y1 = _heart_box()
        return _heart_raw(x0 + (u + 1) / 2 * (x1 - x0), y0 + (v + 1) / 2 * (y1 - y0))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.55 ** 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Scene:
    """One image's content. ``colours`` has one entry (solid) or two (a pattern)."""

    shape: str
    colours: tuple[str, ...]
    background: str
    cx: float
    cy: float
    size: float
    pattern: str = "solid"
    pattern_cells: int = 4

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        for name in self.colours + (self.background,):
            if name not in PALETTE:
                raise ValueError(f"colours must be in {COLOURS}, got {name!r}")
        if len(self.colours) != (1 if self.pattern == "solid" else 2):
            raise ValueError("colours must hold 1 colour for 'solid' and 2 for other patterns")
        if self.background in self.colours:
            raise ValueError("background must differ from the object's colours")
        if not 4 <= self.size <= IMAGE_SIZE:
            raise ValueError(f"size must be in [4, {IMAGE_SIZE}], got {self.size}")


def _pattern_index(scene: Scene, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """0 or 1: which of the scene's colours covers each unit-box point."""
    cells = scene.pattern_cells
    if scene.pattern == "solid":
        return np.zeros(u.shape, dtype=int)
    if scene.pattern == "striped":
        return (np.floor((v + 1) / 2 * cells).astype(int)) % 2
    if scene.pattern == "checkered":
        return (np.floor((u + 1) / 2 * cells).astype(int) + np.floor((v + 1) / 2 * cells).astype(int)) % 2
    return (u >= 0).astype(int)  # half: left colour, right colour


def unit_coordinates(cx: float, cy: float, size: float, supersample: int = SUPERSAMPLE):
    """Unit-box coordinates of the sub-pixel centres of the image for a box (cx, cy, size)."""
    n = IMAGE_SIZE * supersample
    centres = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(centres, centres)
    half = size / 2
    return (x - cx) / half, (y - cy) / half


def render_array(scene: Scene, *others: Scene) -> np.ndarray:
    """The scene as float RGB in [0, 255], shape (32, 32, 3), anti-aliased by supersampling.

    ``others`` are further objects drawn on the same background, in order (see
    :func:`pair_scenes`); ValueError if their background differs.
    """
    n = IMAGE_SIZE * SUPERSAMPLE
    image = np.empty((n, n, 3), dtype=np.float32)
    image[:] = np.array(PALETTE[scene.background], dtype=np.float32)
    for item in (scene,) + others:
        if item.background != scene.background:
            raise ValueError("every object of one image must share its background")
        _draw_object(image, item)
    s = SUPERSAMPLE
    return image.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s, 3).mean(axis=(1, 3))


def _draw_object(image: np.ndarray, scene: Scene) -> None:
    """Paint ``scene``'s object into a supersampled (n, n, 3) image, in place."""
    u, v = unit_coordinates(scene.cx, scene.cy, scene.size)
    inside = shape_mask(scene.shape, u, v)
    colours = np.array([PALETTE[c] for c in scene.colours], dtype=np.float32)
    image[inside] = colours[_pattern_index(scene, u, v)[inside]]


def render(scene: Scene, *others: Scene) -> Image.Image:
    return Image.fromarray(np.round(render_array(scene, *others)).astype(np.uint8), mode="RGB")


def random_box(rng: random.Random, min_size: float = MIN_SIZE, max_size: float = MAX_SIZE):
    """A random (cx, cy, size) whose box lies inside the image with a margin."""
    size = rng.uniform(min_size, max_size)
    low, high = MARGIN + size / 2, IMAGE_SIZE - MARGIN - size / 2
    return rng.uniform(low, high), rng.uniform(low, high), size


def boxes_apart(a, b, gap: float = GAP) -> bool:
    """Whether two boxes (cx, cy, size) are at least ``gap`` pixels apart along some axis."""
    reach = (a[2] + b[2]) / 2 + gap
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def random_boxes(rng: random.Random, count: int, min_size: float = PAIR_SIZE[0],
                 max_size: float = PAIR_SIZE[1], tries: int = 1000):
    """``count`` random boxes inside the image, pairwise :func:`boxes_apart` (rejection sampling)."""
    for _ in range(tries):
        boxes = [random_box(rng, min_size, max_size) for _ in range(count)]
        if all(boxes_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            return boxes
    raise ValueError(f"could not place {count} boxes of {min_size}-{max_size} px apart")


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Combo:
    shape: str
    colour: str
    background: str


def all_combos() -> list[Combo]:
    return [Combo(s, c, b) for s in BASE_SHAPES for c in COLOURS for b in COLOURS if b != c]


@lru_cache(maxsize=None)
def held_out_combos(count: int = 12, seed: int = 8) -> tuple[Combo, ...]:
    """Combinations never shown to the base model; every pair of their attributes still is."""
    rng = random.Random(seed)
    combos = all_combos()
    rng.shuffle(combos)
    held: list[Combo] = []
    for combo in combos:
        trial = held + [combo]
        if _pairs_covered([c for c in all_combos() if c not in trial]):
            held = trial
        if len(held) == count:
            break
    return tuple(held)


def _pairs_covered(train: list[Combo]) -> bool:
    pairs = {(c.shape, c.colour) for c in train}, {(c.shape, c.background) for c in train}, \
        {(c.colour, c.background) for c in train}
    needed = {(c.shape, c.colour) for c in all_combos()}, {(c.shape, c.background) for c in all_combos()}, \
        {(c.colour, c.background) for c in all_combos()}
    return all(have == need for have, need in zip(pairs, needed))


@lru_cache(maxsize=None)
def train_combos() -> tuple[Combo, ...]:
    held = set(held_out_combos())
    return tuple(c for c in all_combos() if c not in held)


def caption(shape: str | None, colour: str | None, background: str | None,
            template: int = 0) -> str:
    """A caption from the grammar; ``None`` leaves an attribute out."""
    noun = " ".join(w for w in (colour, shape or "shape") if w)
    if background is None:
        return f"a {noun}"
    if template == 1:
        return f"a {background} background with a {noun}"
    if template == 2:
        return f"a picture of a {noun} on a {background} background"
    return f"a {noun} on a {background} background"


def prompt(combo: Combo) -> str:
    """The canonical prompt of a combination (the evaluation form)."""
    return caption(combo.shape, combo.colour, combo.background)


@dataclass
class CaptionMix:
    """How often training captions use each template and drop attributes."""

    templates: tuple[float, float, float] = (0.7, 0.2, 0.1)
    drop_background: float = 0.05
    drop_colour: float = 0.05
    generic_noun: float = 0.05
    empty: float = 0.1
    extra: dict = field(default_factory=dict)


def training_example(rng: random.Random, combos: tuple[Combo, ...], mix: CaptionMix) -> tuple[Scene, str]:
    """A random scene from ``combos`` and its caption (``""`` for the unconditional branch)."""
    combo = rng.choice(combos)
    cx, cy, size = random_box(rng)
    scene = Scene(combo.shape, (combo.colour,), combo.background, cx, cy, size)
    if rng.random() < mix.empty:
        return scene, ""
    template = rng.choices(range(3), weights=mix.templates)[0]
    shape = None if rng.random() < mix.generic_noun else combo.shape
    colour = None if rng.random() < mix.drop_colour else combo.colour
    background = None if rng.random() < mix.drop_background else combo.background
    return scene, caption(shape, colour, background, template)


# --------------------------------------------------------------------------- two objects


@dataclass(frozen=True)
class PairCombo:
    """Two objects on one background; each object's (shape, colour, background) is a train combo."""

    first: Combo
    second: Combo

    def __post_init__(self):
        if self.first.background != self.second.background:
            raise ValueError("both objects must share the background")
        if (self.first.shape, self.first.colour) == (self.second.shape, self.second.colour):
            raise ValueError("the two objects must differ in shape or colour")

    @property
    def background(self) -> str:
        return self.first.background


def random_pair(rng: random.Random, combos: tuple[Combo, ...]) -> PairCombo:
    """Two different objects from ``combos`` that share a background."""
    first = rng.choice(combos)
    partners = [c for c in combos if c.background == first.background
                and (c.shape, c.colour) != (first.shape, first.colour)]
    return PairCombo(first, rng.choice(partners))


def pair_caption(first: str, second: str, background: str | None, template: int = 0) -> str:
    """A caption of two objects given as noun phrases (``"red circle"``), e.g.
    ``"a red circle and a blue square on a green background"``."""
    objects = f"a {first} and a {second}"
    if background is None:
        return objects
    if template == 1:
        return f"a {background} background with {objects}"
    return f"{objects} on a {background} background"


def pair_scenes(rng: random.Random, pair: PairCombo) -> tuple[Scene, Scene]:
    """The two objects of ``pair`` at random, separated boxes."""
    boxes = random_boxes(rng, 2)
    return tuple(Scene(c.shape, (c.colour,), c.background, *box) for c, box in zip((pair.first, pair.second), boxes))


def companion_objects(used_colours: set[str]) -> list[tuple[str, str]]:
    """Second objects beside a subject, as (shape, colour): every base shape in every colour not
    in ``used_colours`` (the subject's colours and background), each colour once per round, the
    shape shifting by one each round; the first round has one object per free colour."""
    free = [c for c in COLOURS if c not in used_colours]
    return [(BASE_SHAPES[(i + j) % len(BASE_SHAPES)], colour)
            for j in range(len(BASE_SHAPES)) for i, colour in enumerate(free)]
