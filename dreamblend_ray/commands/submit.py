"""`dreamblend submit`: not landed yet (issue #5, Ray job submission)."""

import argparse

from dreamblend_ray.cli import NotLandedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Not implemented yet: lands with issue #5 (Ray job submission)."


def run(args: argparse.Namespace) -> int:
    raise NotLandedError("`dreamblend submit` is not implemented yet: it lands with issue #5 (Ray job submission)")
