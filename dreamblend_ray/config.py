"""Every setting, declared once: frozen, validated configuration dataclasses.

Each field is declared with :func:`setting`: its default, its bounds or choices and its help text.
From that one declaration come the validation (``__post_init__``), the command-line flags of every
command and job (:func:`add_arguments`, :func:`from_args`: one flag name per setting everywhere),
the HTTP request fields and Serve argument bounds (:func:`spec`, read by ``serving/requests.py``)
and the JSON saved in settings.json, subject.json and Parquet rows (:func:`to_dict` /
:func:`from_dict`, which round-trip exactly, nested dataclasses included).

A bad value raises ``ValueError`` naming the field and the allowed range, so a CLI flag, an HTTP
body or a manifest fails with one clear sentence. Values are validated once, where they enter;
after that the frozen object itself is passed on (and serves as a hashable batching key).
"""

from __future__ import annotations

import argparse
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any, Callable

from dreamblend_ray.dtypes import MIXED_PRECISION, normalize_mixed_precision

# Anchored so that the same text is a correct JSON Schema (ECMA) pattern in the OpenAPI schema.
# Python code must test ids with ``fullmatch``: ``re.match`` with ``$`` also accepts a trailing "\n".
SUBJECT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CLASS_NOUN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}$")
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_TENANT = "default"
TOKEN_PATTERN = re.compile(r"^[^\s\x00-\x1f\x7f]{1,32}$")  # no whitespace, no control characters

# One seed range everywhere (CLI, jobs, HTTP, manifests): the largest integer a JSON number holds
# exactly in every client (JavaScript's Number.MAX_SAFE_INTEGER). Image k of a request uses
# (seed + k) modulo MAX_SEED + 1.
MAX_SEED = 2**53 - 1
# One prompt length limit everywhere (characters; the tokenizer truncates to its own length).
MAX_PROMPT_CHARS = 2000


# --------------------------------------------------------------------------------------------
# Checks


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


class SubjectId(str):
    """A subject id that passed :func:`validate_subject_id`: checked once where it entered (a
    manifest, a flag, an HTTP path), then carried as this type, so the storage layout's own guard
    (keys are built only from valid ids) is an isinstance check, not another regex."""


def validate_subject_id(subject_id: str) -> SubjectId:
    """Subject ids become storage keys: only [A-Za-z0-9_-], 1 to 64 characters."""
    if isinstance(subject_id, SubjectId):
        return subject_id
    if not isinstance(subject_id, str) or not SUBJECT_ID_PATTERN.fullmatch(subject_id):
        raise ValueError(
            f"subject_id must match [A-Za-z0-9_-] and be 1 to 64 characters long, got {subject_id!r}")
    return SubjectId(subject_id)


def validate_tenant(tenant: str) -> str:
    """Tenant ids become storage prefixes: [a-z0-9-], 1 to 63 characters, starting with a letter or digit."""
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"tenant must match [a-z0-9][a-z0-9-]{{0,62}}, got {tenant!r}")
    return tenant


def validate_class_noun(class_noun: str) -> str:
    """Class nouns become storage keys of the class-image cache: [A-Za-z0-9 _-], 1 to 64 chars."""
    if not isinstance(class_noun, str) or not CLASS_NOUN_PATTERN.fullmatch(class_noun):
        raise ValueError("class_noun must be 1 to 64 characters of [A-Za-z0-9 _-] starting with a "
                         f"letter or digit, got {class_noun!r}")
    return class_noun


# --------------------------------------------------------------------------------------------
# Declaring a setting


@dataclass(frozen=True)
class Spec:
    """What one field declares besides its type and default (``dataclasses.field`` metadata).

    low/high: inclusive bounds of a number (or of every item of a tuple of numbers).
    choices: allowed values, or a zero-argument callable returning them (a registry, looked up
        when first needed, e.g. ``method/guidance.py``'s distances).
    pattern: a regex a string (or every string item) must ``fullmatch``.
    aliases: older flag spellings that keep working on the command line.
    normalize: maps accepted spellings to the canonical value before the checks (e.g. the dtype
        vocabulary's aliases); it raises ValueError for anything else.
    """

    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple | Callable[[], tuple] | None = None
    pattern: str | None = None
    aliases: tuple[str, ...] = ()
    normalize: Callable[[Any], Any] | None = None

    def allowed(self) -> tuple | None:
        return self.choices() if callable(self.choices) else self.choices


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING,  # noqa: A002
            low: float | None = None, high: float | None = None, choices=None, pattern: str | None = None,
            aliases: tuple[str, ...] = (), normalize: Callable[[Any], Any] | None = None):
    """A dataclass field carrying its :class:`Spec`."""
    meta = {"spec": Spec(help, low, high, choices, pattern, tuple(aliases), normalize)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldType:
    """A field's annotation, taken apart: ``int | None`` -> base int, optional; ``tuple[int, ...]``
    -> base int, sequence; a nested config dataclass -> base that class."""

    base: type
    optional: bool = False
    sequence: bool = False


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


@cache
def field_type(cls, name: str) -> FieldType:
    hint = _hints(cls)[name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is tuple:
        return FieldType(typing.get_args(hint)[0], optional, sequence=True)
    return FieldType(hint, optional)


@cache
def spec(cls, name: str) -> Spec:
    """The declared :class:`Spec` of ``cls.name`` (KeyError for an undeclared field)."""
    return {f.name: f for f in fields(cls)}[name].metadata["spec"]


def settings_of(cls) -> list[str]:
    """The names of the fields declared with :func:`setting`, in declaration order."""
    return [f.name for f in fields(cls) if "spec" in f.metadata]


def check_value(name: str, value: Any, kind: FieldType, rule: Spec) -> None:
    """Validate one value against its declared type and :class:`Spec` (ValueError naming ``name``)."""
    if value is None:
        if not kind.optional:
            raise ValueError(f"{name} must be given (not null)")
        return
    if kind.sequence:
        if not isinstance(value, tuple):
            raise ValueError(f"{name} must be a list, got {value!r}")
        for item in value:
            check_value(name, item, FieldType(kind.base), rule)
        return
    if kind.base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif kind.base in (int, float):
        check_range(name, value, rule.low, rule.high, integer=kind.base is int)
    elif kind.base is str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if rule.pattern and not re.fullmatch(rule.pattern, value):
            raise ValueError(f"{name} {value!r} does not match {rule.pattern}")
    elif is_dataclass(kind.base) and not isinstance(value, kind.base):
        raise ValueError(f"{name} must be a {kind.base.__name__}, got {value!r}")
    allowed = rule.allowed()
    if allowed is not None:
        check_choice(name, value, tuple(allowed))


def validate(config) -> None:
    """Check every declared field of a config dataclass instance (called by ``__post_init__``).

    Lists become tuples and a nested config given as a dict becomes its dataclass (the frozen
    object stays hashable); everything else must already have the declared type.
    """
    cls = type(config)
    prefix = getattr(cls, "_prefix", "")
    for name in settings_of(cls):
        kind, value, rule = field_type(cls, name), getattr(config, name), spec(cls, name)
        if rule.normalize is not None and value is not None:
            object.__setattr__(config, name, value := rule.normalize(value))
        if kind.sequence and isinstance(value, list):
            object.__setattr__(config, name, value := tuple(value))
        elif is_dataclass(kind.base) and isinstance(value, dict):
            object.__setattr__(config, name, value := from_dict(kind.base, value))
        check_value(prefix + name, value, kind, rule)


# --------------------------------------------------------------------------------------------
# JSON: to_dict / from_dict round-trip exactly


def to_dict(config) -> dict:
    """A JSON-ready dict of a config dataclass: nested dataclasses become dicts, tuples lists."""
    def plain(value):
        if is_dataclass(value) and not isinstance(value, type):
            return to_dict(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in fields(config)}


def from_dict(cls, data: dict):
    """The inverse of :func:`to_dict`: ``from_dict(type(c), to_dict(c)) == c``. Unknown keys are a
    ValueError naming them (a typo must not silently fall back to a default)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} settings must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings {unknown} (known: {sorted(known)})")
    return cls(**{name: _from_json(cls, name, value) for name, value in data.items()})


def _from_json(cls, name: str, value: Any) -> Any:
    kind = field_type(cls, name)
    if value is None:
        return None
    if is_dataclass(kind.base) and isinstance(value, dict):
        return from_dict(kind.base, value)
    if kind.sequence and isinstance(value, list):
        return tuple(value)
    return value


# --------------------------------------------------------------------------------------------
# Command line: one flag per setting, named after the field


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _help(cls, name: str) -> str:
    rule, default = spec(cls, name), {f.name: f for f in fields(cls)}[name]
    value = default.default if default.default is not MISSING else default.default_factory()
    bounds = ""
    if rule.low is not None or rule.high is not None:
        bounds = f" [{'-inf' if rule.low is None else rule.low}, {'inf' if rule.high is None else rule.high}]"
    if value is None or value == ():
        shown = "auto" if value is None else "none"
    else:
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return f"{rule.help}{bounds} (default: {shown})".replace("%", "%%")


class _BoolFlag(argparse.Action):
    """``--name [BOOL]`` sets a bool setting (alone: true); ``--no-name [BOOL]`` sets its negation
    (alone: false), the spelling of e.g. ``--no-prior-preservation``."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = True if values is None else values
        negated = bool(option_string and option_string.startswith("--no-"))
        setattr(namespace, self.dest, value != negated)


def _items(parse: Callable[[str], Any]) -> Callable[[str], tuple]:
    """One argument of a list flag: ``1,2`` as well as ``1`` (the older comma-separated spelling)."""
    def items(text: str) -> tuple:
        return tuple(parse(part) for part in text.split(",") if part.strip())
    items.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid int value"
    return items


def _argument_type(normalize: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return normalize(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def add_arguments(parser, cls, names: list[str] | None = None) -> None:
    """Add ``--field-name`` flags for ``names`` (default: every declared setting of ``cls``).

    Every flag defaults to None ("not given"), so the dataclass's own default applies in
    :func:`from_args`; the help text shows that default and the bounds.
    """
    for name in names or settings_of(cls):
        kind, rule = field_type(cls, name), spec(cls, name)
        options = dict(dest=name, default=None, help=_help(cls, name))
        if rule.normalize is not None:
            options["type"] = _argument_type(rule.normalize)
        elif kind.base is bool:
            options.update(type=_parse_bool, nargs="?", action=_BoolFlag, metavar="BOOL")
        elif kind.base in (int, float, str):
            options["type"] = kind.base
            if isinstance(rule.choices, tuple) and not kind.sequence:  # the config checks the rest
                options["choices"] = list(rule.choices)
        else:
            raise TypeError(f"{cls.__name__}.{name} ({kind.base}) has no command-line form")
        if kind.sequence:
            options.update(nargs="+", type=_items(options["type"]))
        negation = ["--no-" + name.replace("_", "-")] if kind.base is bool else []
        parser.add_argument(flag_name(name), *rule.aliases, *negation, **options)


def given_args(cls, args: argparse.Namespace, names: list[str] | None = None) -> dict:
    """The settings of ``cls`` whose flags (:func:`add_arguments`) were given, by field name."""
    given = {name: getattr(args, name) for name in names or settings_of(cls)
             if getattr(args, name, None) is not None}
    return {name: tuple(item for part in v for item in part) if isinstance(v, list) else v
            for name, v in given.items()}


def from_args(cls, args: argparse.Namespace, names: list[str] | None = None, **extra):
    """Build ``cls`` from the flags of :func:`add_arguments` that were given, plus ``extra``."""
    return cls(**given_args(cls, args, names), **extra)


# --------------------------------------------------------------------------------------------
# The settings


def _guidance_choices(registry: str) -> Callable[[], tuple]:
    def names() -> tuple:
        # Deferred: method/guidance.py imports torch, and parsing flags or an HTTP body must not.
        from dreamblend_ray.method import guidance

        return tuple(getattr(guidance, registry))
    return names


@dataclass(frozen=True)
class LayerSelection:
    """Which cross-attention layers the guidance compares."""

    _prefix = "layers."

    places: tuple[str, ...] = setting(("down", "mid", "up"), choices=("down", "mid", "up"),
                                      help="UNet parts whose cross-attention layers are compared")
    resolutions: tuple[int, ...] = setting((), low=1, high=4096,
                                           help="latent side lengths to compare (empty: the lowest num_lowest)")
    num_lowest: int = setting(2, low=1, high=16,
                              help="with no resolutions given, how many of the lowest cross-attention "
                                   "resolutions are compared")
    name_contains: tuple[str, ...] = setting((), help="keep only layers whose processor name contains one "
                                                      "of these (e.g. up_blocks.1)")
    streams: tuple[str, ...] = setting(("double", "joint"), choices=("double", "single", "joint"),
                                       help="transformer bases (Flux, SD3): which joint-attention streams are "
                                            "compared (Flux: double, single; SD3: joint)")
    blocks: tuple[int, ...] = setting((), low=0, high=1000,
                                      help="transformer bases: which block indices are compared (empty: all)")
    normalisation: str = setting("text", choices=("text", "joint"),
                                 help="transformer bases: an image token's map over the prompt is the softmax "
                                      "over the text tokens only (text) or the block's own joint softmax "
                                      "restricted to them (joint)")

    def __post_init__(self):
        if not self.places:
            raise ValueError("layers.places must name at least one of ['down', 'mid', 'up']")
        validate(self)


@dataclass(frozen=True)
class SamplingConfig:
    """Settings of one DreamBlend sampling call (see ARCHITECTURE.md, "The method").

    Frozen and hashable: serving groups requests that can share one sampler call by it.
    """

    num_inference_steps: int = setting(30, low=1, high=1000, aliases=("--steps",), help="T, the DDIM steps")
    guidance_scale: float = setting(3.0, low=0.0, high=50.0, help="classifier-free guidance scale w")
    true_cfg_scale: float = setting(1.0, low=1.0, high=50.0,
                                    help="FLUX.1 only: classifier-free guidance with the negative prompt "
                                         "(the empty one if none is given) when > 1, as FluxPipeline's "
                                         "true_cfg_scale; guidance_scale stays its embedded guidance")
    alpha: float = setting(0.25, low=0.0, high=10.0,
                           help="strength of the attention guidance; 0 is plain DDIM+CFG sampling of E")
    guidance_steps: int | None = setting(None, low=0, high=1000,
                                         help="K, how many first steps are guided (at most T; "
                                              "auto: guidance_fraction x T)")
    guidance_fraction: float = setting(0.3, low=0.0, high=1.0,
                                       help="K as a fraction of T when guidance_steps is not given")
    step_size: float = setting(1.0, low=0.0, high=1e4, help="eta, the base step of the latent update")
    eta_schedule: str = setting("linear", choices=_guidance_choices("ETA_SCHEDULES"),
                                help="how eta decays over the guided steps")
    distance: str = setting("l1", choices=_guidance_choices("DISTANCES"),
                            help="distance between E's and G's attention maps")
    token_indices: tuple[int, ...] = setting((), low=1, high=1024,
                                             help="1-based prompt token positions to compare (empty: all)")
    layers: LayerSelection = setting(default_factory=LayerSelection,
                                     help="which cross-attention layers are compared")
    height: int | None = setting(None, low=8, high=4096, help="image height in pixels (auto: the model's)")
    width: int | None = setting(None, low=8, high=4096, help="image width in pixels (auto: the model's)")
    return_reference: bool = setting(False, aliases=("--reference",), help="also return G's reference images")
    attention_maps: bool = setting(False, help="also return per-token cross-attention heat maps of G, E and "
                                               "DreamBlend (and G's and unguided E's images), from the same call")
    maps_start: int = setting(0, low=0, high=999,
                              help="first step (0-based) averaged into the heat maps")
    maps_stop: int | None = setting(None, low=1, high=1000,
                                    help="step after the last one averaged into the heat maps (auto: T)")

    def __post_init__(self):
        validate(self)
        if self.guidance_steps is not None:
            check_range("guidance_steps", self.guidance_steps, 0, self.num_inference_steps, integer=True)
        if self.maps_stop is not None:
            check_range("maps_stop", self.maps_stop, 1, self.num_inference_steps, integer=True)
        check_range("maps_start", self.maps_start, 0, self.map_steps.stop - 1, integer=True)

    @property
    def window(self) -> int:
        """K: how many of the first steps are guided."""
        if self.guidance_steps is not None:
            return self.guidance_steps
        return int(round(self.guidance_fraction * self.num_inference_steps))

    @property
    def row_batchable(self) -> bool:
        """Whether per-row sampling (``method/rows.py``, continuous batching) runs this config: it
        does DreamBlend's E only, not the extra trajectories of heat maps or G's reference images."""
        return not (self.attention_maps or self.return_reference)

    @property
    def map_steps(self) -> range:
        """The step indices averaged into the heat maps (when ``attention_maps``)."""
        return range(self.maps_start, self.num_inference_steps if self.maps_stop is None else self.maps_stop)


DEFAULT_CHECKPOINT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class FinetuneConfig:
    """DreamBooth fine-tuning of one subject (see dreamblend_ray/training/finetune.py).

    Checkpoints: ``checkpoint_steps`` or ``checkpoint_every`` (the last step is always saved);
    neither: 10%, 25%, 50%, 75% and 100% of the run. The default G checkpoint is
    ``guidance_step`` or the saved step nearest ``guidance_fraction * steps`` (an underfit model
    that still follows the prompt); the default E is the last step. Both are overridable at
    generation time.
    """

    method: str = setting("lora", choices=("lora", "full"),
                          help="lora: peft LoRA on the UNet attention projections; full: every UNet weight")
    steps: int = setting(400, low=1, high=1_000_000, help="optimizer steps")
    learning_rate: float = setting(1e-4, low=0.0, high=1.0, aliases=("--lr",),
                                   help="AdamW learning rate (1e-4 suits LoRA; full fine-tunes of SD want ~5e-6)")
    lr_warmup_steps: int = setting(0, low=0, high=1_000_000, help="steps of linear learning-rate warm-up")
    batch_size: int = setting(1, low=1, high=1024, help="instance images per step")
    gradient_accumulation_steps: int = setting(1, low=1, high=1024, aliases=("--grad-accum",),
                                                 help="micro-batches per optimizer step")
    seed: int = setting(0, low=0, high=MAX_SEED, help="seed of the run")
    rank: int = setting(4, low=1, high=1024, help="LoRA rank")
    lora_alpha: float | None = setting(None, low=1e-6, high=1e6, help="LoRA alpha (auto: the rank, scale 1)")
    target_modules: tuple[str, ...] = setting(("to_q", "to_k", "to_v", "to_out.0"),
                                              help="UNet linear layers that get LoRA adapters")
    token: str = setting("sks", pattern=TOKEN_PATTERN.pattern,
                         help="rare identifier in the instance prompt 'a photo of {token} {class_noun}'")
    prior_preservation: bool = setting(True, help="add the class-prior loss on images the base model "
                                                  "generates for class_prompt")
    num_class_images: int = setting(50, low=0, high=100_000,
                                    help="class images, generated once per base model and class noun, cached")
    prior_loss_weight: float = setting(1.0, low=0.0, high=1e3, help="weight of the class-prior loss")
    class_prompt: str | None = setting(None, help="prompt of the class images (auto: 'a photo of {class_noun}')")
    class_sampling_steps: int = setting(25, low=1, high=1000, help="DDIM steps of the class images")
    class_guidance_scale: float = setting(3.0, low=0.0, high=50.0, help="CFG scale of the class images")
    resolution: int | None = setting(None, low=8, high=4096,
                                     help="training side length (auto: the base model's native size)")
    min_image_size: int | None = setting(None, low=1, high=65536,
                                         help="reject images whose shorter side is below this (auto: "
                                              "half the resolution)")
    random_flip: bool = setting(False, help="flip instance images horizontally at random")
    max_grad_norm: float = setting(1.0, low=0.0, high=1e6, help="gradient clipping norm")
    adam_weight_decay: float = setting(1e-2, low=0.0, high=1.0, help="AdamW weight decay")
    checkpoint_steps: tuple[int, ...] = setting((), low=1, high=1_000_000,
                                                help="steps at which checkpoints are saved")
    checkpoint_every: int | None = setting(None, low=1, high=1_000_000, help="save a checkpoint every N steps")
    guidance_step: int | None = setting(None, low=1, high=1_000_000,
                                        help="the default G checkpoint (a saved step; auto: nearest "
                                             "guidance_fraction of the run)")
    guidance_fraction: float = setting(0.25, low=0.0, high=1.0,
                                       help="where the default G checkpoint sits in the run")
    mixed_precision: str = setting("auto", choices=MIXED_PRECISION, normalize=normalize_mixed_precision,
                                   help="auto: bf16 autocast on CUDA where supported, else fp16; fp32 "
                                        "elsewhere (float16/bfloat16/fp32 accepted; ignored off CUDA)")
    gradient_checkpointing: bool | None = setting(None, help="auto: on with CUDA, off on CPU")
    device: str | None = setting(None, help="where to train when the base is loaded here (auto: best available)")

    def __post_init__(self):
        validate(self)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        self._check_against_steps()
        if self.prior_preservation and self.num_class_images < 1:
            raise ValueError(f"num_class_images must be in [1, 100000] with prior preservation, "
                             f"got {self.num_class_images}")

    def _check_against_steps(self) -> None:
        check_range("lr_warmup_steps", self.lr_warmup_steps, 0, self.steps, integer=True)
        for step in self.checkpoint_steps:
            check_range("checkpoint_steps", step, 1, self.steps, integer=True)
        if self.checkpoint_steps and self.checkpoint_every is not None:
            raise ValueError("give checkpoint_steps or checkpoint_every, not both")
        for name in ("checkpoint_every", "guidance_step"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1, self.steps, integer=True)

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
