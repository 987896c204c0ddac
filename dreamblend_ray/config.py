"""Frozen, validated configuration dataclasses.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field
and the allowed range, so a CLI flag, an HTTP body or a manifest fails with one clear sentence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from dreamblend_ray.dtypes import normalize_mixed_precision

# Anchored so that the same text is a correct JSON Schema (ECMA) pattern in the OpenAPI schema.
# Python code must test ids with ``fullmatch``: ``re.match`` with ``$`` also accepts a trailing "\n".
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
    if not isinstance(subject_id, str) or not SUBJECT_ID_PATTERN.fullmatch(subject_id):
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
    guidance_fraction: float = 0.3
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


CLASS_NOUN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}$")
TOKEN_PATTERN = re.compile(r"^[^\s\x00-\x1f\x7f]{1,32}$")  # no whitespace, no control characters


def validate_class_noun(class_noun: str) -> str:
    """Class nouns become storage keys of the class-image cache: [A-Za-z0-9 _-], 1 to 64 chars."""
    if not isinstance(class_noun, str) or not CLASS_NOUN_PATTERN.fullmatch(class_noun):
        raise ValueError("class_noun must be 1 to 64 characters of [A-Za-z0-9 _-] starting with a "
                         f"letter or digit, got {class_noun!r}")
    return class_noun


@dataclass(frozen=True)
class FinetuneConfig:
    """DreamBooth fine-tuning of one subject (see dreamblend_ray/training/finetune.py).

    method: "lora" (peft LoRA on the UNet attention projections, the default) or "full" (every
        UNet weight; checkpoints are whole UNets).
    steps: optimizer steps; each consumes ``batch_size * gradient_accumulation_steps`` instance
        images (and as many class images with prior preservation).
    learning_rate: AdamW learning rate (constant after ``lr_warmup_steps`` of linear warm-up).
        1e-4 suits LoRA; full fine-tunes of SD usually want about 5e-6.
    rank, lora_alpha: LoRA rank and alpha (None: alpha = rank, i.e. scale 1).
    target_modules: the UNet linear layers that get LoRA adapters.
    token: the rare identifier in the instance prompt "a photo of {token} {class_noun}".
    prior_preservation: add the class-prior loss on images the base model generates for
        ``class_prompt`` (default "a photo of {class_noun}"); ``num_class_images`` of them are
        generated once per base model and class noun and cached under the output root.
    class_sampling_steps, class_guidance_scale: DDIM steps and CFG scale of that generation.
    resolution: training side length (None: the base model's native size); images are resized
        on the shorter side and centre-cropped. Images whose shorter side is below
        ``min_image_size`` (None: half the resolution) are rejected.
    checkpoint_steps / checkpoint_every: the save schedule, an explicit list of steps or every N
        steps (the last step is always saved). Neither: 10%, 25%, 50%, 75% and 100% of the run.
    guidance_step: the default G checkpoint written to the manifest; None picks the saved step
        nearest ``guidance_fraction * steps`` (default 25%, an underfit model that still follows
        the prompt). The default E checkpoint is the last step. Both are overridable at
        generation time.
    mixed_precision: "auto" (bf16 autocast on CUDA where supported, else fp16; fp32 elsewhere),
        "no", "fp16" or "bf16" (ignored off CUDA).
    gradient_checkpointing: None means on with CUDA, off on CPU.
    device: where to train when ``finetune_subject`` loads the base itself (None: best available).
    """

    method: str = "lora"
    steps: int = 400
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 0
    rank: int = 4
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    token: str = "sks"
    prior_preservation: bool = True
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    class_prompt: str | None = None
    class_sampling_steps: int = 25
    class_guidance_scale: float = 3.0
    resolution: int | None = None
    min_image_size: int | None = None
    random_flip: bool = False
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    checkpoint_steps: tuple[int, ...] = ()
    checkpoint_every: int | None = None
    guidance_step: int | None = None
    guidance_fraction: float = 0.25
    mixed_precision: str = "auto"
    gradient_checkpointing: bool | None = None
    device: str | None = None

    def __post_init__(self):
        check_choice("method", self.method, ("lora", "full"))
        check_range("steps", self.steps, 1, 1_000_000, integer=True)
        check_range("learning_rate", self.learning_rate, 0.0, 1.0)
        check_range("lr_warmup_steps", self.lr_warmup_steps, 0, self.steps, integer=True)
        check_range("batch_size", self.batch_size, 1, 1024, integer=True)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 1024,
                    integer=True)
        check_range("seed", self.seed, 0, 2**63 - 1, integer=True)
        check_range("rank", self.rank, 1, 1024, integer=True)
        if self.lora_alpha is not None:
            check_range("lora_alpha", self.lora_alpha, 1e-6, 1e6)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
        if not isinstance(self.token, str) or not TOKEN_PATTERN.fullmatch(self.token):
            raise ValueError(f"token must be 1 to 32 characters without whitespace or control characters, "
                             f"got {self.token!r}")
        check_range("num_class_images", self.num_class_images,
                    1 if self.prior_preservation else 0, 100_000, integer=True)
        check_range("prior_loss_weight", self.prior_loss_weight, 0.0, 1e3)
        if self.class_prompt is not None and not (isinstance(self.class_prompt, str)
                                                  and self.class_prompt.strip()):
            raise ValueError(f"class_prompt must be a non-empty string or None, got {self.class_prompt!r}")
        check_range("class_sampling_steps", self.class_sampling_steps, 1, 1000, integer=True)
        check_range("class_guidance_scale", self.class_guidance_scale, 0.0, 50.0)
        if self.resolution is not None:
            check_range("resolution", self.resolution, 8, 4096, integer=True)
        if self.min_image_size is not None:
            check_range("min_image_size", self.min_image_size, 1, 65536, integer=True)
        check_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        check_range("adam_weight_decay", self.adam_weight_decay, 0.0, 1.0)
        for step in self.checkpoint_steps:
            check_range("checkpoint_steps", step, 1, self.steps, integer=True)
        if self.checkpoint_steps and self.checkpoint_every is not None:
            raise ValueError("give checkpoint_steps or checkpoint_every, not both")
        if self.checkpoint_every is not None:
            check_range("checkpoint_every", self.checkpoint_every, 1, self.steps, integer=True)
        if self.guidance_step is not None:
            check_range("guidance_step", self.guidance_step, 1, self.steps, integer=True)
        check_range("guidance_fraction", self.guidance_fraction, 0.0, 1.0)
        # One dtype vocabulary (dtypes.py): float16/bfloat16 are aliases, fp32 means "no".
        object.__setattr__(self, "mixed_precision", normalize_mixed_precision(self.mixed_precision))
        if self.gradient_checkpointing not in (None, True, False):
            raise ValueError(f"gradient_checkpointing must be true, false or null, got "
                             f"{self.gradient_checkpointing!r}")

    @property
    def alpha(self) -> float:
        """The LoRA alpha in use (``rank`` unless set)."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def instance_prompt(self, class_noun: str) -> str:
        return f"a photo of {self.token} {class_noun}"

    def class_prompt_for(self, class_noun: str) -> str:
        return self.class_prompt or f"a photo of {class_noun}"

    def schedule(self) -> list[int]:
        """The sorted steps at which checkpoints are saved (always including the last)."""
        if self.checkpoint_steps:
            steps = set(self.checkpoint_steps)
        elif self.checkpoint_every is not None:
            steps = set(range(self.checkpoint_every, self.steps + 1, self.checkpoint_every))
        else:
            steps = {max(1, math.ceil(f * self.steps)) for f in DEFAULT_CHECKPOINT_FRACTIONS}
        return sorted(steps | {self.steps})

    def default_pair(self) -> tuple[int, int]:
        """(guidance_step, edit_step): G nearest ``guidance_fraction`` of the run (ties go to
        the earlier step) unless ``guidance_step`` is set; E is the last step."""
        schedule = self.schedule()
        if self.guidance_step is not None:
            if self.guidance_step not in schedule:
                raise ValueError(f"guidance_step {self.guidance_step} is not a saved checkpoint "
                                 f"step (saved: {schedule})")
            return self.guidance_step, schedule[-1]
        target = self.guidance_fraction * self.steps
        return min(schedule, key=lambda s: (abs(s - target), s)), schedule[-1]


DEFAULT_CHECKPOINT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
