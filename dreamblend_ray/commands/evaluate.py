"""`dreamblend evaluate`: not landed yet (issue #9, evaluation)."""

import argparse

from dreamblend_ray.cli import NotLandedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Not implemented yet: lands with issue #9 (evaluation)."


def run(args: argparse.Namespace) -> int:
    raise NotLandedError("`dreamblend evaluate` is not implemented yet: it lands with issue #9 (evaluation)")
