"""`dreamblend generate`: not landed yet (issue #3, DreamBlend guided sampling)."""

import argparse

from dreamblend_ray.cli import NotLandedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Not implemented yet: lands with issue #3 (DreamBlend guided sampling)."


def run(args: argparse.Namespace) -> int:
    raise NotLandedError("`dreamblend generate` is not implemented yet: it lands with issue #3 (DreamBlend guided sampling)")
