"""``dreamblend version``: the package version and those of the libraries it rests on."""

import argparse
import importlib.metadata
import sys

from dreamblend_ray import __version__

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "ray", "pyarrow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="also list key library versions")


def run(args: argparse.Namespace) -> int:
    lines = [f"dreamblend-ray {__version__}"]
    if args.all:
        for name in LIBRARIES:
            try:
                lines.append(f"{name} {importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                lines.append(f"{name} (not installed)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
