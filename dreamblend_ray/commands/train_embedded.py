"""`dreamblend train-embedded`: not landed yet (issue #8, the embedded model's training)."""

import argparse

from dreamblend_ray.cli import NotLandedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Not implemented yet: lands with issue #8 (the embedded model's training)."


def run(args: argparse.Namespace) -> int:
    raise NotLandedError("`dreamblend train-embedded` is not implemented yet: it lands with issue #8 (the embedded model's training)")
