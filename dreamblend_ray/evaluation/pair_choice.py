"""Automatic choice of the (guidance, edit) checkpoint pair of one subject from a score table.

Fine-tuning moves a subject's checkpoints from underfit (prompt-faithful, weak likeness) to overfit
(strong likeness, prompt ignored). DreamBlend wants G as late as possible while it still follows
prompts, and E with the best likeness. The rule (:func:`choose_pair`):

- guidance step: the LATEST checkpoint whose prompt fidelity is at least
  ``base_prompt_fidelity - tolerance * |base_prompt_fidelity|`` (relative tolerance, default 10%).
  When no checkpoint qualifies, the checkpoint with the highest prompt fidelity (ties: the earliest)
  is taken and ``fallback`` is set.
- edit step: among the checkpoints AT OR AFTER the guidance step, the one with the highest subject
  fidelity; ties go to the EARLIEST of them (an earlier checkpoint is less overfit for the same
  likeness, so it keeps more prompt fidelity and diversity). DreamBlend's premise is an early G
  guiding a late E, so E never comes before G.

When no later checkpoint is more faithful than G itself, E = G (``identical``: DreamBlend then
reduces to plain sampling of that checkpoint). ``edit_reason`` records why E was chosen, including
when a checkpoint before G had the best likeness overall (noisy scores, or a subject learnt early)
and was passed over.

Scores come from :func:`score_checkpoints`, which samples a few validation prompts per checkpoint
with the DreamBlend sampler (alpha 0, G == E: plain sampling of that checkpoint) and hands the
images to a pluggable scorer: ``scorer(images, plain_prompts) -> {"prompt_fidelity",
"subject_fidelity"}``; e.g. :class:`dreamblend_ray.evaluation.metrics.ClipDinoScorer` (CLIP-T and DINO) for
real models, or ``dreamblend_ray.embedded.scorer.EmbeddedScorer`` (the embedded model's analytic metrics).

Wiring (the fine-tuning job): after ``finetune_subject`` has written subject.json, call
:func:`choose_and_record` with the same base components, a scorer and a few validation prompts
(e.g. ``benchmark.prompts_for(kind, class_noun, token, limit=4)``, or for the embedded model
``embedded.scorer.embedded_prompts``: the subject beside a few second objects); it rewrites subject.json with the chosen
``guidance_step`` / ``edit_step`` and the scores under ``pair_choice``. ``load_pair`` (sampler,
Serve endpoint, evaluation) then uses the recorded pair unless told other steps.
:func:`auto_choose_pair` does this from :class:`PairChoiceOptions`, building the prompts and the
scorer; the fine-tuning job calls it per subject (``run_finetune_job(..., pair_choice=...)``,
``--choose-pair``). Scorers are looked up by name in :data:`SCORERS`: "clip-dino" is registered
here, "embedded" by ``dreamblend_ray.embedded.scorer`` when that module is imported (the toy
world plugs in from above; nothing here imports it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

from tqdm.auto import tqdm

from dreamblend_ray.config import SamplingConfig, check_choice, check_range, to_dict
from dreamblend_ray.method.pair import adapters_disabled, single

logger = logging.getLogger(__name__)

SCORE_KEYS = ("prompt_fidelity", "subject_fidelity")
RULE = ("guidance: latest step with prompt_fidelity >= base - tolerance*|base|; "
        "edit: highest subject_fidelity among steps >= guidance, ties to the earliest step")


def finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def validate_scores(scores: Iterable[dict], keys: tuple[str, ...] = SCORE_KEYS, name: str = "scores") -> list[dict]:
    """The per-checkpoint rows sorted by step, each with a step and a finite number under every
    key of ``keys``; ValueError (naming ``name``) for missing keys, bad values or duplicate steps."""
    rows = []
    for i, row in enumerate(scores):
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{name}[{i}] must be a dict with keys step, {', '.join(keys)}")
        check_range(f"{name}[{i}].step", row["step"], 0, None, integer=True)
        clean = dict(row)
        for key in keys:
            if key not in row:
                raise ValueError(f"{name}[{i}] (step {row['step']}) has no {key}")
            clean[key] = finite(f"{name}[{i}].{key}", row[key])
        rows.append(clean)
    if not rows:
        raise ValueError(f"{name} must hold at least one checkpoint")
    steps = [r["step"] for r in rows]
    if len(set(steps)) != len(steps):
        raise ValueError(f"{name} list a step twice: {sorted(steps)}")
    return sorted(rows, key=lambda r: r["step"])


def choose_pair(scores: list[dict], base_prompt_fidelity: float, tolerance: float = 0.1) -> dict:
    """Choose (guidance_step, edit_step) from per-checkpoint scores; see the module docstring.

    scores: ``[{"step": int, "prompt_fidelity": float, "subject_fidelity": float, ...}, ...]``.
    Returns a JSON-ready dict for subject.json: guidance_step, edit_step, identical, fallback,
    threshold, base_prompt_fidelity, tolerance, rule and the sorted scores.
    """
    rows = validate_scores(scores)
    base = finite("base_prompt_fidelity", base_prompt_fidelity)
    check_range("tolerance", tolerance, 0.0, 1.0)
    threshold = base - tolerance * abs(base)
    qualifying = [r for r in rows if r["prompt_fidelity"] >= threshold]
    fallback = not qualifying
    if qualifying:
        guidance = qualifying[-1]
    else:
        guidance = max(rows, key=lambda r: (r["prompt_fidelity"], -r["step"]))
        logger.warning("no checkpoint keeps prompt fidelity >= %.4f (base %.4f); guidance falls back "
                       "to the most prompt-faithful step %d", threshold, base, guidance["step"])
    edit, edit_reason = choose_edit(rows, guidance["step"])
    return {
        "guidance_step": guidance["step"],
        "edit_step": edit["step"],
        "identical": guidance["step"] == edit["step"],
        "edit_reason": edit_reason,
        "fallback": fallback,
        "threshold": threshold,
        "base_prompt_fidelity": base,
        "tolerance": float(tolerance),
        "rule": RULE,
        "scores": rows,
    }


def _most_faithful(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["subject_fidelity"], -r["step"]))


def choose_edit(rows: list[dict], guidance_step: int) -> tuple[dict, str]:
    """The edit checkpoint among ``rows`` (sorted score rows) at or after ``guidance_step``, and why.

    The most subject-faithful row at or after G (ties: the earliest); E = G when nothing later is
    more faithful. The reason names a more faithful checkpoint before G when one was passed over.
    """
    edit = _most_faithful([r for r in rows if r["step"] >= guidance_step])
    best = _most_faithful(rows)
    if edit["step"] == guidance_step:
        reason = f"no checkpoint after the guidance step {guidance_step} is more subject-faithful: E = G"
    else:
        reason = (f"step {edit['step']} has the highest subject fidelity ({edit['subject_fidelity']:.4g}) "
                  f"at or after the guidance step {guidance_step}")
    if best["step"] < guidance_step and best["subject_fidelity"] > edit["subject_fidelity"]:
        reason += (f"; step {best['step']} scored higher ({best['subject_fidelity']:.4g}) but comes "
                   f"before G, and E never precedes G")
    return edit, reason


# --------------------------------------------------------------------------- scoring checkpoints

Scorer = Callable[[list, list], dict]


def _plain_config(config):
    """The sampling config with guidance off (alpha 0): plain DDIM+CFG sampling of E."""
    config = config or SamplingConfig()
    return dataclasses.replace(config, alpha=0.0, return_reference=False)


def score_model(sampler, pair, prompts: list[str], plain_prompts: list[str], seeds: list[int],
                scorer: Scorer, config=None) -> dict:
    """Sample every (prompt, seed) with ``pair`` at alpha 0 and score the images.

    ``prompts`` carry the identifier token (what the model is asked), ``plain_prompts`` are the
    same prompts without it (what prompt fidelity is measured against). Returns the scorer's dict
    plus ``num_images``.
    """
    if len(prompts) != len(plain_prompts) or not prompts:
        raise ValueError("prompts and plain_prompts must be non-empty lists of the same length")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    batch_prompts = [p for p in prompts for _ in seeds]
    batch_plain = [p for p in plain_prompts for _ in seeds]
    batch_seeds = [s for _ in prompts for s in seeds]
    result = sampler.sample(pair, batch_prompts, batch_seeds, _plain_config(config))
    scores = dict(scorer(result.images, batch_plain))
    missing = [k for k in SCORE_KEYS if k not in scores]
    if missing:
        raise ValueError(f"the scorer returned no {missing}")
    return {**{k: float(v) for k, v in scores.items()}, "num_images": len(result.images)}


def score_checkpoints(sampler, pair_for_step: Callable[[int], object], steps: list[int],
                      prompts: list[str], plain_prompts: list[str], seeds: list[int],
                      scorer: Scorer, config=None, release: Callable[[object], None] | None = None,
                      progress: bool = True) -> list[dict]:
    """Score each checkpoint: ``[{"step", "prompt_fidelity", "subject_fidelity", "num_images"}]``.

    ``pair_for_step(step)`` returns a pair whose G and E are both that checkpoint (e.g.
    ``AdapterPair(unet, name, name)``); ``release(pair)``, when given, is called after scoring it
    (to unload adapters). The base model's prompt fidelity, which :func:`choose_pair` also needs,
    is :func:`score_model` on ``dreamblend_ray.method.pair.single(base_unet)`` with the same prompts.
    """
    rows = []
    for step in tqdm(list(steps), desc="scoring checkpoints", disable=not progress):
        pair = pair_for_step(step)
        try:
            row = score_model(sampler, pair, prompts, plain_prompts, seeds, scorer, config)
        finally:
            if release is not None:
                release(pair)
        logger.info("step %d: prompt fidelity %.4f, subject fidelity %.4f", step,
                    row["prompt_fidelity"], row["subject_fidelity"])
        rows.append({"step": step, **row})
    return rows


def choose_and_record(root: str, subject_id: str, components, scorer: Scorer, prompts: list[str],
                      plain_prompts: list[str], seeds: list[int], config=None, tolerance: float = 0.1,
                      steps: list[int] | None = None, progress: bool = True,
                      extra: dict | None = None) -> dict:
    """Score a fine-tuned subject's checkpoints, choose its pair and record it in subject.json.

    Call after ``finetune_subject`` wrote the manifest. The base model (adapters disabled) and each
    saved checkpoint (``steps``, default all) are sampled on ``prompts`` x ``seeds``; the manifest's
    ``guidance_step`` / ``edit_step`` are replaced by :func:`choose_pair`'s and the whole choice
    (scores, threshold, base scores, rule) is stored under ``pair_choice``. The manifest is rewritten
    atomically; returns it. ``extra`` (JSON-ready) is added to the ``pair_choice`` entry.
    """
    from dreamblend_ray.method.sampler import DreamBlendSampler  # defers transformers
    from dreamblend_ray.training import checkpoints, layout  # defers pyarrow, transformers

    manifest = layout.read_manifest(root, subject_id)
    sampler = DreamBlendSampler(components)
    with adapters_disabled(components.denoiser):
        base = score_model(sampler, single(components.denoiser), prompts, plain_prompts, seeds, scorer, config)

    def pair_for_step(step: int):
        return checkpoints.load_pair(root, subject_id, components, guidance_step=step, edit_step=step)[0]

    rows = score_checkpoints(sampler, pair_for_step, steps or manifest["steps"], prompts, plain_prompts,
                             seeds, scorer, config, release=lambda p: checkpoints.unload_pair(p, components),
                             progress=progress)
    choice = choose_pair(rows, base["prompt_fidelity"], tolerance)
    choice.update(base_scores=base, prompts=list(prompts), seeds=list(seeds), **(extra or {}))
    manifest = {**manifest, "guidance_step": choice["guidance_step"], "edit_step": choice["edit_step"],
                "pair_choice": choice}
    layout.write_manifest(root, subject_id, manifest)
    logger.info("subject %s: guidance step %d, edit step %d (%s)", subject_id, choice["guidance_step"],
                choice["edit_step"], choice["edit_reason"])
    return manifest


# --------------------------------------------------------------------------- the fine-tuning job's hook

MAX_PROMPTS = 25  # the DreamBooth benchmark has 25 prompts per kind


def _no_check(options: "PairChoiceOptions") -> None:
    return None


@dataclass(frozen=True)
class ScorerPlugin:
    """A pair-choice scorer, registered by name in :data:`SCORERS`.

    ``build(options, instance_images, class_noun, token, device)`` returns ``(scorer, prompts,
    plain_prompts)`` for one subject; ``check(options)`` validates the options only this scorer reads
    (a ValueError), when a :class:`PairChoiceOptions` naming it is made. A plugin that chooses
    without scoring images gives ``choose`` instead of ``build``: ``choose(root, subject_id,
    components, instance_images, class_noun, token, options, progress)`` records the pair and
    returns the manifest (e.g. "attention", ``dreamblend_ray.evaluation.collapse``).
    """

    build: Callable[..., tuple[Scorer, list[str], list[str]]] | None = None
    check: Callable[["PairChoiceOptions"], None] = _no_check
    choose: Callable[..., dict] | None = None


SCORERS: dict[str, ScorerPlugin] = {}  # name -> plugin, in registration order


def register_scorer(name: str, plugin: ScorerPlugin) -> ScorerPlugin:
    """Make ``name`` a choice of ``PairChoiceOptions.scorer`` (and of ``--choose-pair``) in this process.

    Registering the same plugin again is a no-op; another plugin under a taken name is a ValueError.
    A Ray actor gets the driver's plugin through its constructor (``FinetuneActor``), which
    registers it there too.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a scorer name must be a non-empty string, got {name!r}")
    if not isinstance(plugin, ScorerPlugin):
        raise ValueError(f"plugin must be a ScorerPlugin, got {type(plugin).__name__}")
    if SCORERS.get(name, plugin) != plugin:
        raise ValueError(f"another pair-choice scorer is already registered as {name!r}")
    SCORERS[name] = plugin
    return plugin


def scorer_plugin(name: str) -> ScorerPlugin:
    """The registered scorer ``name``; ValueError naming the registered ones otherwise."""
    check_choice("scorer", name, tuple(SCORERS))
    return SCORERS[name]


@dataclass(frozen=True)
class PairChoiceOptions:
    """How the fine-tuning job chooses a subject's pair (see :func:`auto_choose_pair`).

    scorer: a name in :data:`SCORERS`: "clip-dino" (CLIP-T and DINO, from the transformers models at
    ``clip_model`` / ``dino_model``, local or s3://; both required) or, once ``dreamblend_ray.embedded.scorer``
    is imported, "embedded" (the shapes-world model's analytic metrics; the default).
    Every checkpoint and the base model are sampled on ``num_prompts`` validation prompts x ``seeds``
    with ``steps`` DDIM steps at ``guidance_scale``; ``tolerance`` is :func:`choose_pair`'s.
    ``context``: what the embedded scorer's prompts add (``embedded.scorer.embedded_prompts``).
    """

    scorer: str = "embedded"
    clip_model: str | None = None
    dino_model: str | None = None
    num_prompts: int = 4
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 20
    guidance_scale: float = 2.0
    tolerance: float = 0.1
    context: str = "companion"

    def __post_init__(self):
        scorer_plugin(self.scorer).check(self)
        check_range("num_prompts", self.num_prompts, 1, MAX_PROMPTS, integer=True)
        if isinstance(self.seeds, (str, bytes)) or not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        for seed in self.seeds:
            check_range("seeds", seed, 0, 2**32 - 1, integer=True)
        object.__setattr__(self, "seeds", tuple(self.seeds))
        check_range("steps", self.steps, 1, 1000, integer=True)
        check_range("guidance_scale", self.guidance_scale, 0.0, 50.0)
        check_range("tolerance", self.tolerance, 0.0, 1.0)

    @classmethod
    def from_dict(cls, data: dict) -> "PairChoiceOptions":
        """The inverse of ``config.to_dict`` (how the job hands the options to its actors)."""
        return cls(**data)

    def sampling_config(self):
        return SamplingConfig(num_inference_steps=self.steps, guidance_scale=self.guidance_scale, alpha=0.0)


@lru_cache(maxsize=1)
def _clip_dino_models(clip_model: str, dino_model: str, device: str):
    """CLIP and DINO loaded once per process (an actor scores many subjects)."""
    from dreamblend_ray.evaluation.metrics import load_clip, load_dino

    return load_clip(clip_model, device, option="--clip-model"), load_dino(dino_model, device, option="--dino-model")


def _build_clip_dino(options: PairChoiceOptions, instance_images: list, class_noun: str, token: str, device=None):
    from dreamblend_ray.evaluation import protocol as benchmark
    from dreamblend_ray.evaluation.metrics import ClipDinoScorer

    prompts, plain = benchmark.prompts_for("object", class_noun, token, limit=options.num_prompts)
    clip, dino = _clip_dino_models(options.clip_model, options.dino_model, str(device or "cpu"))
    return ClipDinoScorer(clip, dino, list(instance_images)), prompts, plain


def _check_clip_dino(options: PairChoiceOptions) -> None:
    for name in ("clip_model", "dino_model"):
        value = getattr(options, name)
        if not isinstance(value, str) or not value:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{name} ({option}) is required when the pair-choice scorer is "
                             "'clip-dino': a local directory or s3:// URI of a transformers model")


register_scorer("clip-dino", ScorerPlugin(build=_build_clip_dino, check=_check_clip_dino))


def build_scorer(options: PairChoiceOptions, instance_images: list, class_noun: str, token: str,
                 device=None) -> tuple[Scorer, list[str], list[str]]:
    """(scorer, prompts, plain prompts) for one subject under ``options`` (its registered scorer)."""
    if not instance_images:
        raise ValueError("instance_images must hold at least one image of the subject")
    if scorer_plugin(options.scorer).build is None:
        raise ValueError(f"the pair-choice scorer {options.scorer!r} scores no images (it has no build)")
    return scorer_plugin(options.scorer).build(options, instance_images, class_noun, token, device)


def auto_choose_pair(root: str, subject_id: str, components, instance_images: list, class_noun: str,
                     token: str, options: PairChoiceOptions, progress: bool = False) -> dict:
    """Score a fine-tuned subject's checkpoints and record the chosen pair in its subject.json.

    Builds the validation prompts and the scorer from ``options`` (embedded: the subject in a
    context its images never showed, scored by the analytic metrics; clip-dino: the first ``num_prompts``
    DreamBooth object prompts, scored by CLIP-T and DINO against ``instance_images``) and calls
    :func:`choose_and_record`. The manifest's ``pair_choice`` also records the options used.
    Returns the rewritten manifest.
    """
    if not isinstance(options, PairChoiceOptions):
        raise ValueError(f"options must be a PairChoiceOptions, got {type(options).__name__}")
    choose = scorer_plugin(options.scorer).choose
    if choose is not None:  # a plugin that chooses without scoring images (e.g. "attention")
        return choose(root, subject_id, components, instance_images, class_noun, token, options, progress)
    scorer, prompts, plain = build_scorer(options, instance_images, class_noun, token,
                                          getattr(components, "device", None))
    return choose_and_record(root, subject_id, components, scorer, prompts, plain, list(options.seeds),
                             options.sampling_config(), options.tolerance, progress=progress,
                             extra={"options": to_dict(options), "plain_prompts": list(plain)})
