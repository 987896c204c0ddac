"""`dreamblend finetune`: not landed yet (issue #4, DreamBooth fine-tuning)."""

import argparse

from dreamblend_ray.cli import NotLandedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Not implemented yet: lands with issue #4 (DreamBooth fine-tuning)."


def run(args: argparse.Namespace) -> int:
    raise NotLandedError("`dreamblend finetune` is not implemented yet: it lands with issue #4 (DreamBooth fine-tuning)")
