"""Frozen, validated configuration dataclasses.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field
and the allowed range, so a CLI flag, an HTTP body or a manifest fails with one clear sentence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

SUBJECT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                integer: bool = False) -> None:
    """Raise ValueError unless ``low <= value <= high`` (and an int when ``integer``)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def validate_subject_id(subject_id: str) -> str:
    """Subject ids become storage keys: only [A-Za-z0-9_-], 1 to 64 characters."""
    if not isinstance(subject_id, str) or not SUBJECT_ID_PATTERN.match(subject_id):
        raise ValueError(
            f"subject_id must match [A-Za-z0-9_-] and be 1 to 64 characters long, got {subject_id!r}")
    return subject_id


def to_dict(config) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class LayerSelection:
    """Which cross-attention layers the guidance compares.

    places: subset of ("down", "mid", "up").
    resolutions: latent side lengths (e.g. (8, 16)); empty means "the lowest ``num_lowest``
        resolutions that have cross-attention" (the default: the two lowest).
    name_contains: optional substrings; when given, a layer is kept only if its processor name
        contains one of them (e.g. "up_blocks.1").
    """

    places: tuple[str, ...] = ("down", "mid", "up")
    resolutions: tuple[int, ...] = ()
    num_lowest: int = 2
    name_contains: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.places:
            raise ValueError("layers.places must name at least one of ['down', 'mid', 'up']")
        for place in self.places:
            check_choice("layers.places", place, ("down", "mid", "up"))
        for res in self.resolutions:
            check_range("layers.resolutions", res, 1, 4096, integer=True)
        check_range("layers.num_lowest", self.num_lowest, 1, 16, integer=True)


@dataclass(frozen=True)
class SamplingConfig:
    """Settings of one DreamBlend sampling call (see ARCHITECTURE.md, "The method").

    alpha: strength of the attention guidance; 0 disables it (plain DDIM+CFG sampling of E).
    guidance_steps: K, the number of first steps that are guided; None means
        ``round(guidance_fraction * num_inference_steps)``.
    step_size: eta, the base step of the latent update; scaled per step by ``eta_schedule``.
    """

    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    alpha: float = 0.25
    guidance_steps: int | None = None
    guidance_fraction: float = 0.5
    step_size: float = 1.0
    eta_schedule: str = "linear"
    token_indices: tuple[int, ...] = ()
    layers: LayerSelection = field(default_factory=LayerSelection)
    height: int | None = None
    width: int | None = None
    return_reference: bool = False

    def __post_init__(self):
        check_range("num_inference_steps", self.num_inference_steps, 1, 1000, integer=True)
        check_range("guidance_scale", self.guidance_scale, 0.0, 50.0)
        check_range("alpha", self.alpha, 0.0, 10.0)
        check_range("guidance_fraction", self.guidance_fraction, 0.0, 1.0)
        if self.guidance_steps is not None:
            check_range("guidance_steps", self.guidance_steps, 0, self.num_inference_steps, integer=True)
        check_range("step_size", self.step_size, 0.0, 1e4)
        check_choice("eta_schedule", self.eta_schedule, ("constant", "linear", "cosine"))
        for idx in self.token_indices:
            check_range("token_indices", idx, 1, 1024, integer=True)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 8, 4096, integer=True)

    @property
    def window(self) -> int:
        """K: how many of the first steps are guided."""
        if self.guidance_steps is not None:
            return self.guidance_steps
        return int(round(self.guidance_fraction * self.num_inference_steps))
