"""`dreamblend serve`: not landed yet (issue #6, the Ray Serve endpoint)."""

import argparse

from dreamblend_ray.cli import NotLandedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Not implemented yet: lands with issue #6 (the Ray Serve endpoint)."


def run(args: argparse.Namespace) -> int:
    raise NotLandedError("`dreamblend serve` is not implemented yet: it lands with issue #6 (the Ray Serve endpoint)")
