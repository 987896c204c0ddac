"""Demo subjects the embedded base model never saw: new shapes with two-colour patterns.

Each subject has 5 instance images (seeded: varied position and size, fixed shape, pattern and
colours), all on one background colour, so that an overfit fine-tune also learns that context,
as DreamBooth does on real photos. Patterns are coarse (cells of at least 4 px) so that the
16x16 latent can hold them. The class noun is ``shape``: the base model knows it as "any shape of
the world" (a few training captions use it), which gives DreamBooth a meaningful class prior.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dreamblend_ray.config import check_choice
from dreamblend_ray.embedded import world

TOKEN = "sks"
CLASS_NOUN = "shape"
INSTANCE_SIZES = (14.0, 18.0)  # small enough to leave room for a second object
CONTEXTS = ("companion", "background")


@dataclass(frozen=True)
class Subject:
    subject_id: str
    shape: str
    pattern: str
    colours: tuple[str, str]
    background: str
    description: str
    num_images: int = 5
    seed: int = 0
    class_noun: str = CLASS_NOUN
    token: str = TOKEN

    def __post_init__(self):
        if self.shape not in world.SUBJECT_SHAPES:
            raise ValueError(f"shape must be one of the subject shapes {world.SUBJECT_SHAPES}, got {self.shape!r}")
        if not 4 <= self.num_images <= 6:
            raise ValueError(f"num_images must be in [4, 6], got {self.num_images}")
        world.Scene(self.shape, self.colours, self.background, 16, 16, 20, self.pattern)  # validates

    @property
    def instance_prompt(self) -> str:
        return f"a {self.token} {self.class_noun}"

    def prompt(self, background: str | None = None) -> str:
        """``a sks shape on a <background> background`` (the instance prompt without one)."""
        if background is None:
            return self.instance_prompt
        return f"{self.instance_prompt} on a {background} background"

    def companion_prompt(self, shape: str, colour: str) -> str:
        """``a sks shape and a <colour> <shape> on a <own background> background``: the subject
        beside a second, named object, on the background of its instance images."""
        return f"{self.instance_prompt} and a {colour} {shape} on a {self.background} background"

    def companions(self) -> list[tuple[str, str]]:
        """Second objects for :meth:`companion_prompt`, as (shape, colour): base shapes in the
        colours that are neither the subject's nor its background's (one shape per colour)."""
        free = len(world.COLOURS) - len({self.background, *self.colours})
        return world.companion_objects({self.background, *self.colours})[:free]

    def context_prompts(self, context: str, count: int) -> list[str]:
        """``count`` prompts in contexts the instance images never showed: ``"companion"`` (a
        second, named object beside the subject) or ``"background"`` (a new background colour)."""
        if context == "companion":
            return [self.companion_prompt(shape, colour) for shape, colour in self.companions()[:count]]
        if context == "background":
            return [self.prompt(background) for background in self.new_backgrounds()[:count]]
        check_choice("context", context, CONTEXTS)

    def new_backgrounds(self) -> list[str]:
        """Background colours other than the subject's own and its object colours."""
        return [c for c in world.COLOURS if c != self.background and c not in self.colours]

    def scenes(self) -> list[world.Scene]:
        """Evenly spread sizes, seeded random positions (inside the image, with a margin)."""
        rng = random.Random(f"{self.subject_id}-{self.seed}")
        low, high = INSTANCE_SIZES
        scenes = []
        for i in range(self.num_images):
            size = low + (high - low) * i / (self.num_images - 1)
            cx, cy, _ = world.random_box(rng, size, size)
            scenes.append(world.Scene(self.shape, self.colours, self.background, cx, cy, size,
                                      self.pattern))
        return scenes

    def instance_images(self) -> list[Image.Image]:
        return [world.render(scene) for scene in self.scenes()]

    def save_instance_images(self, directory: str | Path) -> list[Path]:
        """Write the instance images as PNGs into ``directory``; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.instance_images()):
            path = directory / f"{self.subject_id}-{i}.png"
            image.save(path)
            paths.append(path)
        return paths


SUBJECTS: tuple[Subject, ...] = (
    Subject("striped-star", "star", "striped", ("yellow", "black"), "blue",
            "a star with horizontal yellow and black stripes"),
    Subject("checkered-heart", "heart", "checkered", ("red", "white"), "green",
            "a heart with a 4x4 red and white checker pattern"),
    Subject("half-ring", "ring", "half", ("red", "white"), "black",
            "a ring, red on its left half and white on its right half"),
)


def get_subject(subject_id: str) -> Subject:
    for subject in SUBJECTS:
        if subject.subject_id == subject_id:
            return subject
    raise ValueError(f"subject must be one of {[s.subject_id for s in SUBJECTS]}, got {subject_id!r}")
