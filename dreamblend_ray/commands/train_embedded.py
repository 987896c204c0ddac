"""``dreamblend train-embedded``: train the embedded shapes-world base model from scratch on CPU.

The defaults reproduce the shipped weights (dreamblend_ray/embedded/weights/TRAINING.md); the
same as ``python -m dreamblend_ray.embedded.train``.
"""

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dreamblend_ray.embedded.train import add_arguments as add_training_arguments

    add_training_arguments(parser)
    parser.epilog = ("Writes a diffusers StableDiffusionPipeline directory (safetensors) to --out, "
                     "with EMA checkpoints under --out/checkpoints/step-N.")


def run(args: argparse.Namespace) -> int:
    from dreamblend_ray.models.components import embedded_model_dir
    from dreamblend_ray.embedded.train import config_from_args, runner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as error:
        raise SystemExit(f"dreamblend train-embedded: {error}")
    try:
        runner(args)(args.out or embedded_model_dir(), config)
    except ValueError as error:
        raise SystemExit(f"dreamblend train-embedded: {error}")
    return 0
