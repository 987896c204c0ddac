"""The embedded model's pair-choice scorer: checkpoint scores from the shapes world's exact metrics.

Importing this module registers it as the ``"embedded"`` scorer of
:mod:`dreamblend_ray.evaluation.pair_choice` (``--choose-pair embedded``), and its companion prompts
as the attention probe's prompts for the embedded base (``evaluation.collapse``); the toy world plugs into
the production pair choice here, and the production code never imports it. The processes that
offer it import this module: the job entry points, the demo and the tests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from dreamblend_ray.config import check_choice
from dreamblend_ray.embedded import metrics as analytic, world
from dreamblend_ray.embedded.subjects import CONTEXTS
from dreamblend_ray.evaluation.collapse import register_probe_prompts
from dreamblend_ray.evaluation.pair_choice import PairChoiceOptions, ScorerPlugin, register_scorer


@dataclass
class EmbeddedScorer:
    """Checkpoint scores on the embedded shapes-world model, from its exact analytic metrics.

    prompt_fidelity = the pooled accuracy of the attributes the prompts ask for (background colour,
    shape, colour), or, for prompts that add a second object, the share of images with that object's
    shape and colour right (``metrics.context_fidelity``); subject_fidelity = the shape/pattern/colour
    agreement with the subject's instance images (see dreamblend_ray/embedded/metrics.py).
    """

    instance_images: list

    def __call__(self, images, plain_prompts: list[str]) -> dict:
        fidelity = analytic.prompt_fidelity(images, plain_prompts)
        second_objects = all(len(analytic.parse_prompt(p).objects) > 1 for p in plain_prompts)
        prompt = analytic.context_fidelity(fidelity) if second_objects else fidelity["overall"]
        if prompt is None:
            raise ValueError("the validation prompts ask for no attribute the embedded metrics can read "
                             "(use prompts like 'a sks shape on a red background')")
        subject = analytic.subject_fidelity(images, self.instance_images)["score"]
        return {"prompt_fidelity": prompt, "subject_fidelity": subject}


def instance_backgrounds(instance_images: list) -> list[str]:
    """The palette colours the instance images' backgrounds read as (analytic metrics), most common first."""
    counts = Counter(analytic.read_image(image).background for image in instance_images)
    return [colour for colour, _ in counts.most_common()]


def embedded_prompts(instance_images: list, class_noun: str, token: str, num_prompts: int,
                     context: str = "companion") -> tuple[list[str], list[str]]:
    """Validation prompts for the embedded model, in a context the instance images never showed.

    ``companion`` (default, as the demo): the subject beside a second, named object on its own
    background, "a sks shape and a red circle on a blue background"; the object's colour is
    neither the instance background nor one of the subject's colours. ``background``: the subject
    on a new background colour (world colours other than the instance background(s), in palette
    order). Either way prompt fidelity measures whether a checkpoint still follows the prompt
    rather than reproducing its training images. Returns (prompts with the token, the same
    without it).
    """
    check_choice("context", context, CONTEXTS)
    own = instance_backgrounds(instance_images)
    contexts = (_companions(instance_images, own[0]) if context == "companion"
                else [f" on a {bg} background" for bg in world.COLOURS if bg not in own])
    if num_prompts > len(contexts):
        raise ValueError(f"num_prompts must be at most {len(contexts)} for the embedded scorer with context "
                         f"{context!r} (instance background(s) {sorted(own)}), got {num_prompts}")
    chosen = contexts[:num_prompts]
    return [f"a {token} {class_noun}{c}" for c in chosen], [f"a {class_noun}{c}" for c in chosen]


def _companions(instance_images: list, background: str) -> list[str]:
    """`` and a <colour> <shape> on a <background> background`` for the world's second objects in
    the colours the subject does not use (:func:`world.companion_objects`)."""
    used = {background}
    for image in instance_images:
        used |= {name for name, share in analytic.read_image(image).colours.items() if share >= 0.05}
    return [f" and a {colour} {shape} on a {background} background" for shape, colour in world.companion_objects(used)]


def build(options: PairChoiceOptions, instance_images: list, class_noun: str, token: str, device=None):
    """(scorer, prompts, plain prompts) for one subject: prompts in ``options.context``."""
    prompts, plain = embedded_prompts(instance_images, class_noun, token, options.num_prompts, options.context)
    return EmbeddedScorer(list(instance_images)), prompts, plain


def check(options: PairChoiceOptions) -> None:
    check_choice("context", options.context, CONTEXTS)


PLUGIN = register_scorer("embedded", ScorerPlugin(build=build, check=check))


def probe_prompts(instance_images: list, class_noun: str, token: str, num_prompts: int) -> list[str]:
    """The attention probe's prompts for the embedded base: the subject beside a second object."""
    return embedded_prompts(instance_images, class_noun, token, num_prompts, "companion")[0]


register_probe_prompts("embedded", probe_prompts)
